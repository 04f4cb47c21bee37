"""ShotStream clients: the async client library (`clients.client`), the `shotstream-client`
CLI (`clients.cli`), the load generator (`clients.load`) and the browser page (`clients/web`).
Nothing here imports torch or the model: clients share only `server.protocol`."""
