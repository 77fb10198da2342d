"""packserve scheduler: request state, KV-block accounting, FFD packing. Pure Python, no torch."""

from .block_manager import BlockAllocator, block_hash, blocks_for
from .config import PrefillMode, SchedulerConfig, SchedulingPolicy
from .lora_slots import LoRASlots
from .outputs import (
    NewRequest,
    RunnerOutput,
    ScheduledSequence,
    SchedulerOutput,
    TokenEvent,
    TokenLogprobs,
)
from .packing import pack_ffd, pack_rows, row_cost
from .request import (
    MAX_REPETITION_PENALTY,
    MIN_REPETITION_PENALTY,
    Request,
    RequestStatus,
    SamplingParams,
    StructuredOutput,
)
from .scheduler import Scheduler

__all__ = [
    "MAX_REPETITION_PENALTY",
    "MIN_REPETITION_PENALTY",
    "BlockAllocator",
    "LoRASlots",
    "NewRequest",
    "PrefillMode",
    "Request",
    "RequestStatus",
    "RunnerOutput",
    "SamplingParams",
    "ScheduledSequence",
    "Scheduler",
    "SchedulerConfig",
    "SchedulingPolicy",
    "SchedulerOutput",
    "StructuredOutput",
    "TokenEvent",
    "TokenLogprobs",
    "block_hash",
    "blocks_for",
    "pack_ffd",
    "pack_rows",
    "row_cost",
]
