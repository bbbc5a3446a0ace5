"""COCO category names by the contiguous ids torchvision's detection models predict (0 is background).

Kept here as plain data so the catalog and the submission check need no torchvision import; the
tests compare it with torchvision's own list.
"""

from __future__ import annotations

COCO_CATEGORIES: tuple[str, ...] = (
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse",
    "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A", "N/A",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat",
    "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "N/A", "wine glass", "cup", "fork",
    "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza",
    "donut", "cake", "chair", "couch", "potted plant", "bed", "N/A", "dining table", "N/A", "N/A", "toilet",
    "N/A", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "N/A", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)

NUM_CLASSES = len(COCO_CATEGORIES)  # 91, background and the unused "N/A" ids included


def parse_classes(text: str) -> frozenset[int] | None:
    """``"person, car"`` or ``"1,3"`` to the COCO ids to keep; empty means every class (``None``).

    Raises ValueError naming the unknown entries, so a typo is refused at submit, not silently
    matching nothing.
    """
    wanted = [t.strip() for t in text.split(",") if t.strip()]
    if not wanted:
        return None
    by_name = {name: i for i, name in enumerate(COCO_CATEGORIES) if name not in ("__background__", "N/A")}
    ids, unknown = set(), []
    for item in wanted:
        if item.isdigit() and int(item) in by_name.values():
            ids.add(int(item))
        elif item.lower() in by_name:
            ids.add(by_name[item.lower()])
        else:
            unknown.append(item)
    if unknown:
        raise ValueError(f"unknown COCO class {', '.join(repr(u) for u in unknown)} "
                         f"(names such as person, car, dog, or ids 1-90)")
    return frozenset(ids)
