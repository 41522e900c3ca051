"""Per-generation statistics the CLI prints, the API returns and the benchmarks record."""

from __future__ import annotations

import resource
import sys
from dataclasses import asdict, dataclass

import psutil


def peak_rss_bytes() -> int:
    """Peak resident set size of this process.

    Linux: VmHWM from /proc/self/status. ru_maxrss would do on its own but it is inherited
    through fork and exec, so a process started by a large parent (pytest, a server) reports
    at least the parent's size. Elsewhere ru_maxrss (psutil has no peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def rss_bytes() -> int:
    return psutil.Process().memory_info().rss


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    prompt_tokens_reused: int = 0  # prompt tokens whose KV came from the prefix cache
    prompt_s: float = 0.0
    generation_tokens: int = 0
    generation_s: float = 0.0
    ttft_s: float = 0.0
    bytes_read: int = 0
    units_read: int = 0
    io_stall_s: float = 0.0
    read_s: float = 0.0
    compute_s: float = 0.0
    unit_hits: int = 0
    unit_misses: int = 0
    # units that late-bound calls picked at run time (routed experts): cache hits, misses and
    # bytes read for them (all 0 for a dense model)
    expert_hits: int = 0
    expert_misses: int = 0
    expert_bytes_read: int = 0
    # --expert-lookahead: experts read on a guess, those then picked, bytes of the others
    lookahead_reads: int = 0
    lookahead_used: int = 0
    lookahead_wasted_bytes: int = 0
    peak_rss_bytes: int = 0
    prefetch_depth: int = 0
    prefill_passes: int = 0  # passes that carried prompt rows of this request
    prefill_bytes_read: int = 0  # bytes those passes read
    prefill_memory_bytes: int = 0  # the activation bound they ran under
    # why the prompt took more than one pass: "" (it did not), "prefill memory" (its
    # activations did not fit at once) or "decoding" (other requests were decoding: the
    # prompt rode their passes in prefill_chunk rows)
    prefill_split: str = ""
    # speculative decoding: the mode ("" off), decode passes that sampled for this request,
    # draft tokens they carried and how many were accepted, bytes read by the decode passes
    speculative: str = ""
    decode_passes: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    decode_bytes_read: int = 0

    @property
    def prompt_tps(self) -> float:
        return self.prompt_tokens / self.prompt_s if self.prompt_s > 0 else 0.0

    @property
    def generation_tps(self) -> float:
        return self.generation_tokens / self.generation_s if self.generation_s > 0 else 0.0

    @property
    def tokens_per_pass(self) -> float:
        """Generated tokens per decode pass (1 without speculation)."""
        return self.generation_tokens / self.decode_passes if self.decode_passes else 0.0

    @property
    def accepted_per_pass(self) -> float:
        """Accepted draft tokens per decode pass."""
        return self.accepted_tokens / self.decode_passes if self.decode_passes else 0.0

    @property
    def bytes_per_token(self) -> float:
        """Bytes the decode passes read per generated token."""
        return self.decode_bytes_read / self.generation_tokens if self.generation_tokens else 0.0

    @property
    def hit_rate(self) -> float:
        total = self.unit_hits + self.unit_misses
        return self.unit_hits / total if total else 0.0

    @property
    def expert_hit_rate(self) -> float:
        total = self.expert_hits + self.expert_misses
        return self.expert_hits / total if total else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(prompt_tps=self.prompt_tps, generation_tps=self.generation_tps,
                 hit_rate=self.hit_rate, expert_hit_rate=self.expert_hit_rate,
                 tokens_per_pass=self.tokens_per_pass, accepted_per_pass=self.accepted_per_pass,
                 bytes_per_token=self.bytes_per_token)
        return d
