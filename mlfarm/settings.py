"""The one typed settings object for every mlfarm process.

Values come, in order of precedence, from keyword arguments, ``MLFARM_*`` environment
variables, a TOML file named by ``MLFARM_CONFIG`` (default ``~/.config/mlfarm/mlfarm.toml``),
and the defaults below. Workers, the CLI, the gateway and Flower all read the same object so
a farm is configured in one place.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from mlfarm.keys import CACHE_TTL, JOB_TTL

#: MLFARM_WORKERS_PER_GPU=auto takes two processes a GPU where each GPU has this much memory (two
#: copies of the models: Mask R-CNN takes about 7 GiB) and the host this many cores a GPU (each
#: process reads and writes EXRs on its own share).
AUTO_TWO_MIN_GPU_GIB = 32
AUTO_TWO_MIN_CORES = 8


def _xdg(var: str, fallback: str) -> Path:
    return Path(os.environ.get(var) or Path.home() / fallback)


def default_data_dir() -> Path:
    return _xdg("XDG_DATA_HOME", ".local/share") / "mlfarm"


def default_config_file() -> Path:
    return Path(os.environ.get("MLFARM_CONFIG") or _xdg("XDG_CONFIG_HOME", ".config") / "mlfarm" / "mlfarm.toml")


class _FarmSettings(BaseSettings):
    """Where every settings group reads from, in order: keyword arguments, ``MLFARM_*`` environment
    variables, then the TOML file (``MLFARM_CONFIG``)."""

    model_config = SettingsConfigDict(env_prefix="MLFARM_", extra="ignore")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, default_config_file()))


class PluginSettings(_FarmSettings):
    """Base of a model plugin's own settings group, declared as its ``settings_class``.

    Read like the core ``Settings`` (MLFARM_* environment variables, then the settings file), so a
    plugin names its fields with its group's prefix (``mrcnn_batch_size``: MLFARM_MRCNN_BATCH_SIZE,
    or ``mrcnn_batch_size = 4`` in mlfarm.toml) and adds nothing to the core.
    """


class Settings(_FarmSettings):
    # --- broker -------------------------------------------------------------------------
    broker_url: str | None = Field(
        default=None,
        description="redis://[:password@]host:port/db. Unset: use the embedded local Redis started by `mlfarm up`.",
    )
    data_dir: Path = Field(default_factory=default_data_dir, description="Embedded Redis data, state files.")
    visibility_timeout: int = Field(
        default=3900,
        description="Seconds before an unacknowledged chunk (its worker died) is redelivered. "
        "Must exceed the longest chunk, i.e. task_time_limit.",
    )
    result_expires: int = Field(default=86400, description="Seconds Celery keeps chunk results.")
    job_ttl: int = Field(default=JOB_TTL, description="Seconds a job record is kept after its last change.")
    cache: bool = Field(
        default=True, description="Skip frames whose exact result is already on the storage (the frame cache): "
        "same model, weights, options, output layout and input pixels. A job submitted with --force renders "
        "anyway; false turns the lookup off farm-wide (outputs still carry their keys).",
    )
    cache_ttl: int = Field(
        default=CACHE_TTL, ge=60, description="Seconds an output stays findable by its content key in Redis "
        "after it was written or last found (the file itself is never deleted by the farm).",
    )

    # --- storage and frame I/O ----------------------------------------------------------
    storage_root: Path = Field(
        default_factory=lambda: default_data_dir() / "storage",
        description="Shared storage. Workers refuse to write anywhere else.",
    )
    exr_compression: Literal["none", "rle", "zips", "zip", "piz", "pxr24", "b44", "b44a", "dwaa", "dwab"] = Field(
        default="zips", description="EXR compression for outputs: zips (zlib, one scanline a chunk: Nuke's "
        "default, and what GPU workers compress on the GPU), zip (16 lines a chunk, ~10% smaller), rle (fastest "
        "on the CPU, larger), piz, pxr24, b44, b44a, dwaa, dwab or none.",
    )
    exr_gpu_compress: bool = Field(
        default=True,
        description="Compress zips outputs that a model leaves on the GPU there (nvCOMP, from the gpu extra), "
        "instead of on the worker's cores. Off, or without nvCOMP, they are copied back and compressed on the CPU.",
    )
    exr_gpu_deflate_effort: int = Field(
        default=2, ge=0, le=5,
        description="nvCOMP's deflate effort for outputs compressed on the GPU, 0 (fastest, Huffman coding "
        "only) to 5 (smallest files). On an H200, 2 gave Mask R-CNN's planes files a third smaller than 1 at "
        "the same single-thread speed (benchmarks/bench_gpu_zip.py); depth in the farm on an H100 ran no faster "
        "with 0 (116.9 against 115.0, 110.2 against 118.1 frames/s). Any effort writes standard zips EXRs.",
    )
    exr_nvcomp_pools: bool = Field(
        default=True,
        description="nvCOMP's working memory (GPU compression and decoding) from torch's caching allocator and a "
        "pinned pool mlfarm keeps, instead of nvCOMP allocating and freeing CUDA memory at every frame (each free "
        "waits for the whole GPU). On an H100, 16 threads decoded 1.14x and decoded and encoded 1.21x the "
        "frames/s with it, and a network beside them ran 1.13x faster; depth in the farm, decoding on the host, "
        "was within noise either way (81.5-86.3 against 86.0 frames/s). Off: nvCOMP's own allocators.",
    )
    exr_gpu_decode: bool = Field(
        default=False,
        description="Decode zip, zips and uncompressed EXR plates on the GPU (nvCOMP, from the gpu extra) for models "
        "that take frames there (depth, flow, SAM 2), so the worker's cores only read the files. Off by default: "
        "on an H100 depth ran 5% faster with it on grainy zips plates (one scanline a chunk) but 25% slower on zip "
        "plates (16: nvCOMP's inflate of few long chunks kept the GPU busy). Off, without nvCOMP, or for other "
        "plates, frames are decoded on the worker's cores.",
    )
    exr_rgba_half: bool = Field(
        default=True,
        description="Write the rgba plane as half; data planes stay float unless the model returns them as half.",
    )
    io_threads: int = Field(
        default=0, ge=0, description="Threads per worker reading and writing frames. 0 (auto): sized with the "
        "worker's other pools from its cores (worker/sizing.py; the worker's first log line says what it chose): "
        "on a GPU worker one a core it may run on (at least two; depth on grainy plates ran 1.15x faster than with "
        "the cores less two, Mask R-CNN the same), on a CPU worker 2.",
    )
    io_nice: int = Field(
        default=5, ge=0, le=19, description="Niceness added to a worker's I/O threads (and OpenEXR's, which they "
        "start), so the thread that feeds the GPU gets a core first (Linux; measured: +8-14% Mask R-CNN "
        "frames/s on busy 16-core H100 hosts, no change on a fast one).",
    )
    exr_threads: int = Field(
        default=0,
        ge=-1,
        description="OpenImageIO's OpenEXR threads per process, decoding the EXRs OpenImageIO reads (tiled, deep or "
        "multi-part ones; a plain scanline EXR is decoded by OpenEXR's binding on the I/O thread that reads it, and "
        "outputs are encoded on the I/O thread that writes them): N exactly N, -1 none (each I/O thread decodes "
        "its own frames), 0 (auto): "
        "a worker sizes it with its other pools (worker/sizing.py): one per core it may use on a GPU worker, none "
        "on a CPU worker; outside a worker, one per core.",
    )

    # --- models ---------------------------------------------------------------------------
    models_path: str = Field(default="", description="Extra model folders, separated by os.pathsep.")
    model_cache_size: int = Field(default=2, ge=1, description="Loaded models a worker keeps warm.")

    # --- tasks ---------------------------------------------------------------------------
    default_chunk: int = Field(default=4, ge=1)
    frame_time_limit: int = Field(
        default=300, ge=1, description="Seconds one frame may take; a chunk's time limit scales with its frames."
    )

    chunk_slack: int = Field(default=60, ge=1, description="Seconds a chunk's time limit adds for model loading.")
    sequence_segment: int = Field(
        default=200, ge=1, description="Most frames one task of a sequence model (SAM 2) renders before it hands "
        "the rest of its direction on to the next task, which resumes from the last frame written. A task also "
        "hands on early when its next frame could outlast the broker's redelivery timeout.",
    )
    max_attempts: int = Field(
        default=3, ge=0, description="Attempts a frame gets when each one ends without a result (worker killed, "
        "crashed, stopped); then it fails with that reason instead of taking down worker after worker. 0: no limit.",
    )
    bad_worker_failures: int = Field(
        default=3, ge=0, description="Frames a worker may fail of one job for reasons that are not the input's "
        "(model errors, a model that will not load, CUDA errors, out of memory, time limits) before it is bad for "
        "that job: it takes none of its chunks any more and hands them back. Such a frame is queued again for "
        "another worker (not counted against MLFARM_MAX_ATTEMPTS) while a living worker that has not failed it "
        "and is not bad for the job can take it; then it fails, saying so. 0: never bad, no retry elsewhere.",
    )
    worker_dead_after: int = Field(
        default=60, ge=4, description="Seconds without a heartbeat after which a worker process counts as dead "
        "(killed, out of memory, its host gone): the frames it was rendering are queued again. Workers beat "
        "every quarter of it.",
    )
    reconcile_interval: int = Field(
        default=300, ge=1, description="Seconds between a worker's checks for frames whose chunk message the "
        "broker lost (also run after every reconnect to Redis).",
    )
    reconcile_grace: float = Field(
        default=30.0, gt=0, description="Seconds a frame must have been queued or running, uncovered by any "
        "message, before the reconciler queues it again.",
    )
    restore_interval: int = Field(
        default=10, ge=1, description="Seconds between a worker's sweeps for chunks of dead workers to redeliver."
    )

    # --- worker --------------------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="Where GPU models run.")
    worker_tags: str = Field(
        default="", description="Comma-separated tags of this worker (as `mlfarm worker --tags 80gb,h200`), "
        "matched against jobs' requirements (`mlfarm submit --require`). Empty: derived from its GPU (a memory "
        "class like 80gb, a model like h200, and gpu), or cpu for a CPU worker.",
    )
    worker_threads: int = Field(
        default=0, ge=0, le=8, description="Tasks a worker process (`mlfarm worker`, one per GPU) takes at once, "
        "on threads sharing its models: the next chunk's frames are read while the last batches of the one "
        "before are inferred and written, instead of the GPU idling at every chunk boundary. Tasks run side by "
        "side when they are chunks of one model, whatever their options (they travel with each chunk); others "
        "(another model's chunks, MLClient frames, training) take turns. Measured with Mask R-CNN on an H100 at "
        "4-frame chunks: 1.37-1.66x with 2, 1.53x with 3, and 3 beat 2 in three runs of three; no change at "
        "52-frame chunks. "
        "1: one task at a time (Celery's solo pool). 0 (auto, worker/sizing.py): 3 on a GPU worker, 1 on a CPU "
        "worker (its model's batches take every core; measured on 2 cores). Ignored with --concurrency N > 1 "
        "(prefork processes).",
    )
    torch_threads: int = Field(
        default=0, ge=0, description="torch's intra-op threads in a worker process (one operator on several "
        "cores). 0 (auto, worker/sizing.py): every core the process may use, shared among prefork processes; "
        "torch's inter-op threads are 1 on a CPU worker. Training tasks use MLFARM_TRAIN_THREADS instead.",
    )

    # --- gateway / flower ---------------------------------------------------------------
    gateway_port: int = 55555
    flower_port: int = 5555
    flower_basic_auth: str | None = Field(default=None, description="user:password for Flower.")

    # --- MLClient gateway (mlfarm/gateway) --------------------------------------------------
    gateway_host: str = Field(
        default="0.0.0.0",
        description="Interface the gateway listens on. The MLClient protocol has no authentication: "
        "use a studio-internal interface (127.0.0.1 for one workstation).",
    )
    gateway_max_body: int = Field(default=2 * 1024**3, ge=1, description="Largest request body accepted, bytes.")
    gateway_client_timeout: float = Field(
        default=30.0, gt=0, description="Seconds a client may stay silent while sending its request."
    )
    gateway_max_clients: int = Field(default=32, ge=1, description="Connections served at once (threads).")
    gateway_pickup_timeout: float = Field(
        default=30.0, gt=0, description="Seconds an inference request waits for a worker to take it."
    )
    gateway_script_models: str = Field(
        default="",
        description="Comma-separated model ids whose `PythonScript` objects the gateway forwards to Nuke "
        "(which executes them). Empty: none are forwarded.",
    )
    # --- MLClient gateway: transport, heartbeat ---------------------------------------------
    gateway_transport: Literal["redis", "storage"] = Field(
        default="storage",
        description="How a frame's pixels travel between the gateway and a worker: `storage` (raw files in "
        "a hidden folder of the storage root, which the gateway and every worker must see at their "
        "MLFARM_STORAGE_ROOT) or `redis` (through the broker). Chosen by benchmarks/bench_gateway.py.",
    )
    gateway_heartbeat: float = Field(
        default=5.0, gt=0, description="Seconds without a heartbeat from the worker running a request before "
        "the gateway tells the artist that worker died, instead of waiting for the frame's time limit.",
    )

    # --- deploying a GPU farm: Flower and the per-GPU worker supervisor -----------------
    flower_address: str = Field(
        default="",
        description="Address Flower listens on. Empty: 0.0.0.0 when MLFARM_FLOWER_BASIC_AUTH is set; without "
        "auth, 127.0.0.1 for a farm on this machine, and a farm elsewhere is refused.",
    )
    flower_persistent: bool = Field(
        default=True, description="Keep Flower's task history across restarts, in DATA_DIR/flower/."
    )
    flower_save_interval: int = Field(
        default=60, ge=0, description="Seconds between saves of Flower's history (0: only when it stops)."
    )
    cpus: str = Field(
        default="", description="Cores a worker runs on, e.g. 0-15 (as `mlfarm worker --cpus`); empty: every core "
        "it may use. One container per GPU: give each its own share.",
    )
    workers_per_gpu: Literal["auto"] | Annotated[int, Field(ge=1, le=8)] = Field(
        default="auto", description="`mlfarm worker --gpus`: worker processes per GPU, each its own Python "
        "(its own GIL) and CUDA context, taking chunks side by side, each on its own share of the cores. Measured "
        "on an H100 with Mask R-CNN at 1080p: 2 gave 1.06-1.34x the frames/s of 1 (GPU busy 80-90% instead of "
        "53-69%). Each process holds its own copy of the models in GPU memory (Mask R-CNN: about 7 GiB); only "
        "the first of a GPU takes training runs. auto: 2 where every GPU has at least "
        f"{AUTO_TWO_MIN_GPU_GIB} GiB and there are at least {AUTO_TWO_MIN_CORES} cores a GPU, else 1.",
    )
    split_cpus: bool = Field(
        default=True, description="`mlfarm worker --gpus` with several GPUs: pin each GPU's worker to its own "
        "equal share of the cores (EXR encoding is CPU work; workers sharing every core slow each other)."
    )
    supervisor_max_restart_delay: float = Field(
        default=60.0, gt=0, description="`mlfarm worker --gpus`: longest wait before restarting a child that "
        "keeps dying (the wait doubles from 1 s while it dies within a minute of starting)."
    )

    # --- submitting from Nuke (nuke_submit/) -----------------------------------------------
    nuke_output_template: str = Field(
        default="{shot}/ml/{model}/v{version:03d}/{shot}_{model}_v{version:03d}.####.exr",
        description="Default output pattern, relative to the storage root; {shot}, {model}, {version} "
        "(the first version with no frames on disk).",
    )
    nuke_render_template: str = Field(
        default="{shot}/ml/_renders/{node}_{stamp}/{node}.####.exr",
        description="Where a node that is not a Read of EXRs on shared storage is rendered before submitting; "
        "relative to the storage root; {shot}, {node}, {stamp}.",
    )
    nuke_shared_roots: str = Field(
        default="",
        description="Folders besides the storage root that every worker sees at the same path, separated by "
        "os.pathsep: Read nodes of EXR sequences there are read by the farm directly, not rendered first.",
    )
    nuke_poll_interval: float = Field(default=2.0, gt=0, description="Seconds between progress polls in Nuke.")
    nuke_timeout: float = Field(
        default=3.0, gt=0, description="Seconds Nuke waits for the farm's Redis to connect or answer before "
        "telling the artist it cannot reach the farm. No retries: Nuke's interface waits meanwhile.",
    )

    # --- model weights (a plugin's own settings: its settings_class, a PluginSettings) -----------
    weights_dir: Path = Field(
        default_factory=lambda: default_data_dir() / "weights",
        description="Model weight files (e.g. Mask R-CNN's COCO state dicts), looked for before a model's own "
        "folder; `mlfarm models fetch NAME` downloads into it. Nothing is downloaded at run time.",
    )

    # --- training on the farm (models/training, worker/train_task.py) ----------------------
    train_time_limit: int = Field(
        default=7 * 86400, ge=1,
        description="Seconds one training task may run. Then it writes a checkpoint and stops, its remaining "
        "epochs fail with the reason, and `mlfarm retry JOB` resumes from that checkpoint.",
    )
    train_checkpoint_interval: int = Field(
        default=600, ge=1, description="Seconds between checkpoints inside an epoch (one is also written at the "
        "end of every epoch, and before any stop).",
    )
    train_keep_checkpoints: int = Field(default=5, ge=1, description="Newest checkpoints kept per run.")
    train_threads: int = Field(
        default=0, ge=0, description="CPU threads a training task uses (0: torch's default, every core).",
    )

    @property
    def train_heartbeat(self) -> float:
        """Seconds between a trainer's heartbeats: at most a quarter of the visibility timeout, so a
        running training task is never redelivered, and of ``worker_dead_after``, so the lease of a
        trainer that died (three beats) has run out by the time its run is queued again."""
        return max(0.5, min(30.0, self.visibility_timeout / 4, self.worker_dead_after / 4))

    @field_validator("storage_root", "data_dir", "weights_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return Path(os.path.abspath(os.path.expanduser(value)))

    @model_validator(mode="after")
    def _timeouts_consistent(self) -> Settings:
        if self.max_chunk < 1:
            raise ValueError(
                f"MLFARM_VISIBILITY_TIMEOUT ({self.visibility_timeout}s) must exceed one frame's time limit "
                f"plus {self.chunk_slack}s (MLFARM_FRAME_TIME_LIMIT={self.frame_time_limit}s), or running chunks "
                "would be delivered twice"
            )
        return self

    @property
    def sequence_time_budget(self) -> int:
        """Seconds a sequence task may run: it ends its segment early rather than outlast redelivery."""
        return self.visibility_timeout - 2 * self.chunk_slack

    def chunk_time_limit(self, frames: int) -> int:
        """Hard limit for a chunk of ``frames`` frames; always below the visibility timeout."""
        return self.frame_time_limit * frames + self.chunk_slack

    @property
    def max_chunk(self) -> int:
        """The largest chunk whose time limit still ends before the broker would redeliver it."""
        return (self.visibility_timeout - self.chunk_slack - 1) // self.frame_time_limit

    @property
    def model_dirs(self) -> list[Path]:
        return [Path(p) for p in self.models_path.split(os.pathsep) if p.strip()]

    @property
    def nuke_read_roots(self) -> list[str]:
        """Where the farm reads a Read node's frames directly: the storage root and the shared roots."""
        return [str(self.storage_root)] + [p for p in self.nuke_shared_roots.split(os.pathsep) if p.strip()]

    @property
    def embedded_state_file(self) -> Path:
        return self.data_dir / "embedded.json"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
