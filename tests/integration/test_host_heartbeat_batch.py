"""Group commit of heartbeats: concurrent heartbeats share one transaction, and one that fails does not undo
the others (each runs in its own savepoint). Against a real store in a temporary directory."""

from __future__ import annotations

import trio

from kohakuriver_host.context import HostContext
from kohakuriver_host.node_service import HeartbeatBatcher
from kohakuriver_host.store import ReadTx, WriteTx, open_store
from kohakuriver_proto.models import Heartbeat


async def test_a_failing_heartbeat_does_not_undo_the_others(tmp_path):
    async with open_store(tmp_path / "host.db") as store:
        for name in ("a", "b", "c"):
            await store.write(WriteTx.upsert_node, name, "http://127.0.0.1:9", {"total_cores": 1}, now=1.0)
        host = HostContext(
            config=None, store=store, cluster_token="x", runners=None, ids=None, wake_scheduler=lambda: None
        )
        batcher = HeartbeatBatcher(host)
        transactions = 0
        real_write = store.write

        async def counting(fn, *args, **kwargs):
            nonlocal transactions
            transactions += 1
            return await real_write(fn, *args, **kwargs)

        store.write = counting
        results: dict[str, object] = {}

        async def beat(name: str, metrics: dict) -> None:
            try:
                results[name] = await batcher.apply(name, Heartbeat(), metrics, 100.0)
            except Exception as exc:
                results[name] = exc

        async with trio.open_nursery() as nursery:
            await nursery.start(batcher.run)
            async with trio.open_nursery() as beats:
                beats.start_soon(beat, "a", {"cpu_percent": 1.0})
                beats.start_soon(beat, "b", {"bad": {1, 2}})  # not JSON: this heartbeat fails
                beats.start_soon(beat, "c", {"cpu_percent": 3.0})
                beats.start_soon(beat, "ghost", {})
            nursery.cancel_scope.cancel()

        assert transactions == 1  # all four arrived while the batcher waited: one transaction
        assert results["a"].known and results["c"].known and not results["ghost"].known
        assert isinstance(results["b"], Exception)
        nodes = {n.hostname: n for n in await store.read(ReadTx.list_nodes)}
        assert nodes["a"].metrics == {"cpu_percent": 1.0} and nodes["a"].last_heartbeat == 100.0
        assert nodes["c"].metrics == {"cpu_percent": 3.0}
        assert nodes["b"].metrics == {} and nodes["b"].last_heartbeat == 1.0
