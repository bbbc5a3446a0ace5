"""A sequence model for tests whose output is its carried state, so order and resumption show exactly.

The state starts at 0 where the sequence starts, and each frame adds the mean of its input pixels
plus 1000 times the ids of the objects prompted on it. The ``state`` plane holds the state after the
frame; a sequence resumed on another worker starts from the ``state`` plane written on the frame
before, so every frame's value is the same whether or not the shot was interrupted. The ``steps``
plane counts the frames this session has stepped (1 on the first), showing where a session began.
With the ``log`` option each step is appended to that file as ``direction frame``.
"""

import numpy as np

from mlfarm.models import BaseModel


class Model(BaseModel):
    def __init__(self):
        super().__init__()
        self.name = "State counter (tests)"
        self.temporal = "sequence"
        self.promptable = True
        self.inputs = {"image": 4}
        self.outputs = {"rgba": 4, "state": ("V",), "steps": ("V",)}
        self.device = "cpu"
        self.seconds = 0.0
        self.log = ""
        self.options = ("seconds", "log")

    def start_sequence(self, direction, prompts, seed=None):
        value = 0.0 if seed is None else float(seed.planes["state"][0, 0, 0])
        return {"direction": direction, "value": value, "steps": 0}

    def step(self, state, frame, item, prompts):
        import time

        time.sleep(float(self.seconds))
        image = item[0]
        # Kept as float32, the precision the plane is written in, so a resumed state is the same number.
        gain = float(np.mean(image, dtype=np.float64)) + 1000.0 * sum(p.object_id for p in prompts)
        state["value"] = float(np.float32(state["value"] + gain))
        state["steps"] += 1
        if self.log:
            with open(self.log, "a") as fh:
                fh.write(f"{state['direction']} {frame}\n")
        h, w = image.shape[:2]
        return [image, np.full((h, w, 1), state["value"], np.float32), np.full((h, w, 1), state["steps"], np.float32)]
