"""Where the ingress's jobs run, shared by the ingress (ClusterServer) and its Ray Serve router (SlotRouter) in the
ingress process. Its own module, read by an import at each use: Ray Serve may hand the router a copy of its
module's globals (the class pickled by value), and the import finds this one module in sys.modules."""
from __future__ import annotations

ASSIGNED: dict[str, set[str]] = {}  # replica id -> ids of the jobs placed on it
DEAD: set[str] = set()  # replicas seen dead, still listed until the controller drops them
ROUTERS: list = []  # the routers of this process (one per handle): their curr_replicas are the listed replicas


def place(job: str, replica: str) -> None:
    """The job runs on this replica (and on no other)."""
    for jobs in ASSIGNED.values():
        jobs.discard(job)
    ASSIGNED.setdefault(replica, set()).add(job)


def release(job: str) -> None:
    for jobs in ASSIGNED.values():
        jobs.discard(job)


def live_replicas() -> list[str]:
    """Ids of the replicas the ingress's routers can reach now."""
    if not ROUTERS:
        return sorted(ASSIGNED)
    listed = set().union(*({r.unique_id for r in router.curr_replicas} for router in ROUTERS))
    return sorted(listed - DEAD)


def reset() -> None:
    ASSIGNED.clear()
    DEAD.clear()
    ROUTERS.clear()
