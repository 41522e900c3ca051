"""Time: the asyncio layer loop, the prefetch window, the I/O pool and the compute thread."""

from stream_run.scheduler.loop import LayerScheduler, RunStats, SchedulerConfig
from stream_run.scheduler.step import Step, StepLike, UnitLoader, Units

__all__ = ["LayerScheduler", "RunStats", "SchedulerConfig", "Step", "StepLike", "UnitLoader",
           "Units"]
