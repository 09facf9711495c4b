"""Placement-group reaper for loss searches (a Tune callback).

When Tune stops a trial (ASHA, or the end of the trial function), it kills the trial actor, and with it the Ray Train
controller actor that the trial started. The controller's worker placement group is not fate-shared with its creator
(Ray scopes it to the job), and Ray Train's own ``PlacementGroupCleaner`` finds dead controllers through the State API,
which needs the dashboard and a single Ray instance per host. Without a dashboard (tests, ``include_dashboard=False``)
every stopped trial leaks its workers' CPUs/GPUs and later trials wait forever. The reaper removes placement groups
whose creator *actor* is dead (driver-created ones, such as Tune's own, are never touched), from the GCS table
directly — through Ray's private GCS accessor, since the public State API does not expose a group's creator actor.
"""

from __future__ import annotations

import time
from typing import Any


def reap_orphan_placement_groups() -> int:
    """Remove placement groups whose creator actor is dead (leaked by killed Ray Train controllers); returns how
    many. Driver-created groups (no creator actor) and detached ones are left alone."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    removed = 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if pg.state == gcs_pb2.PlacementGroupTableData.REMOVED or pg.is_detached or not pg.creator_actor_dead:
            continue
        if not pg.creator_actor_id or ray.ActorID(pg.creator_actor_id).is_nil():
            continue
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
        removed += 1
    return removed


def reap_until_clean(timeout_s: float = 15.0, poll_s: float = 0.5) -> int:
    """After a search: keep reaping until no actor-created placement group is left or ``timeout_s`` passes (the
    last stopped trial's Train controller dies only after ``Tuner.fit`` has returned); returns how many went."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    removed, deadline = 0, time.monotonic() + timeout_s
    while True:
        removed += reap_orphan_placement_groups()
        left = 0
        for raw in state._connect_and_get_accessor().get_placement_group_table():
            pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
            if (pg.state != gcs_pb2.PlacementGroupTableData.REMOVED and not pg.is_detached and pg.creator_actor_id
                    and not ray.ActorID(pg.creator_actor_id).is_nil()):
                left += 1
        if not left or time.monotonic() > deadline:
            return removed
        time.sleep(poll_s)


def placement_group_reaper(interval_s: float = 2.0):
    """A Tune callback running :func:`reap_orphan_placement_groups` at most every ``interval_s`` seconds of the
    Tune loop, so the workers of stopped trials' Train controllers free their CPUs/GPUs even without a dashboard
    (Ray Train's own cleaner needs the State API)."""
    from ray import tune

    class PlacementGroupReaper(tune.Callback):
        def __init__(self) -> None:
            self.last = 0.0
            self.removed = 0

        def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
            if time.monotonic() - self.last >= interval_s:
                self.last = time.monotonic()
                self.removed += reap_orphan_placement_groups()

    return PlacementGroupReaper()
