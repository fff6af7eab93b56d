"""ember's router plugged into Ray Serve's request-router hook (ray.serve.request_router, Ray 2.60).

Ray Serve runs one instance in each process that holds a handle to the replicas, i.e. ember's ingress, and
asks it for every request: it hands over the live replicas (with the routing stats each one last
reported) and the request's arguments, whose first is the request's `route` (its prompt's block keys and
adapter, made by the ingress). The choice itself is ember.serve_ray.routing.PrefixRouter; Ray keeps what
it is good at: the replica set as it scales and heals, queue-length probes, back-pressure, retries of a
request whose replica is gone before it started.

Why this hook and not the ingress picking a replica itself: a deployment handle cannot address one
replica, and a deployment per replica would give up Ray's autoscaling and replacement of the set.
"""

from __future__ import annotations

from ray.serve.request_router import FIFOMixin, PendingRequest, ReplicaID, RequestRouter, RunningReplica

from ember.serve_ray.routing import PrefixRouter, ReplicaReport, RouteRequest


class EmberRequestRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, **kwargs) -> None:
        self.policy = PrefixRouter(**kwargs)
        self._seen: dict[ReplicaID, int] = {}  # id() of the stats dict each replica's report came from

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        for r in candidate_replicas:
            self._take_report(r)
        by_id = {r.replica_id: r for r in candidate_replicas}
        route = _route(pending_request)
        chosen = self.policy.choose(list(by_id), route)
        rest = sorted((r for r in candidate_replicas if r.replica_id != chosen), key=self._load)
        # Ranked: the chosen one first; if its queue is full, the others, least loaded first.
        return [[by_id[chosen]], rest] if rest else [[by_id[chosen]]]

    def _take_report(self, replica: RunningReplica) -> None:
        stats = replica.routing_stats
        if not stats or self._seen.get(replica.replica_id) == id(stats):
            return
        self._seen[replica.replica_id] = id(stats)
        self.policy.report(
            replica.replica_id,
            ReplicaReport(
                blocks=set(stats.get("blocks", ())),
                adapters=set(stats.get("adapters", ())),
                num_running=stats.get("num_running", 0),
                num_waiting=stats.get("num_waiting", 0),
                kv_usage=stats.get("kv_usage", 0.0),
            ),
        )

    def _load(self, replica: RunningReplica) -> int:
        return self.policy.load(replica.replica_id)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self.policy.sent(replica_id, _route(pending_request) or RouteRequest([]))

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.policy.finished(replica_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self.policy.forget(replica_id)
        self._seen.pop(replica_id, None)


def _route(pending: PendingRequest | None) -> RouteRequest | None:
    """The request's route, if it is a generation call (its first argument)."""
    if pending is None or not pending.args or not isinstance(pending.args[0], dict):
        return None
    route = pending.args[0]
    return RouteRequest(list(route.get("keys", ())), route.get("adapter"))
