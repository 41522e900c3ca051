"""Time: the asyncio layer loop, the prefetch window, the I/O pool and the compute thread."""

from scheduler.loop import LayerScheduler, RunStats, SchedulerConfig, Step, UnitLoader

__all__ = ["LayerScheduler", "RunStats", "SchedulerConfig", "Step", "UnitLoader"]
