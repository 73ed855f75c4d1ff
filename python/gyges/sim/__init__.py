"""Fleet simulator for Gyges and its peers (``python -m gyges.sim``); imports no torch.

The decision logic is the live server's: ``control.scheduler.TransformationScheduler`` and
``core.policy`` run against a simulated clock and a simulated ``SchedulerHost``
(:mod:`gyges.sim.host`), and hosts are chosen by the router's ``router.policy``. This
package adds only what a simulator needs: a step-time and memory cost model
(:mod:`~gyges.sim.cost`), trace readers, a deterministic event loop and the peers' models.
"""
