"""The live stream of one experiment: `ws/experiments/<id>/`.

On connect the browser gets a snapshot rebuilt from the ledger, then every event as it is
published; a late or reconnecting browser therefore loses nothing. Close codes: 4401 not
signed in, 4403 not allowed to see this experiment (or no such experiment).
"""

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from visualization.events import experiment_group
from visualization.snapshot import experiment_snapshot, visible_experiment


class ExperimentConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self):
        await self.accept()  # accept first: a close code reaches the browser only after it
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        self.experiment_id = int(self.scope["url_route"]["kwargs"]["experiment_id"])
        self.group = experiment_group(self.experiment_id)
        # Join before reading the ledger, so that nothing falls between snapshot and events.
        await self.channel_layer.group_add(self.group, self.channel_name)
        snapshot = await self.snapshot()
        if snapshot is None:
            await self.channel_layer.group_discard(self.group, self.channel_name)
            await self.close(code=4403)
            return
        await self.send_json(snapshot)

    @database_sync_to_async
    def snapshot(self) -> dict | None:
        experiment = visible_experiment(self.scope["user"], self.experiment_id)
        return None if experiment is None else experiment_snapshot(experiment)

    async def disconnect(self, code):
        if hasattr(self, "group"):
            await self.channel_layer.group_discard(self.group, self.channel_name)

    async def receive_json(self, content, **kwargs):
        """`ping` is answered with `pong` (the page's heartbeat); `snapshot` resends one."""
        kind = content.get("type") if isinstance(content, dict) else None
        if kind == "ping":
            await self.send_json({"type": "pong"})
        elif kind == "snapshot":
            snapshot = await self.snapshot()
            if snapshot is None:
                await self.close(code=4403)
            else:
                await self.send_json(snapshot)
        else:
            await self.send_json({"type": "error", "detail": "Send {\"type\": \"ping\"} or "
                                  "{\"type\": \"snapshot\"}."})  # fmt: skip

    async def experiment_events(self, message):
        """Events published together (see visualization.events) still reach the page one by
        one, in order."""
        for event in message["events"]:
            await self.send_json(event)
