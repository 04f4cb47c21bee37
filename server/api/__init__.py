"""The HTTP and WebSocket API (protocol v1), one module per resource.

Handlers translate between the wire and the session manager; they never touch tensors.
`deps` holds what every route needs (the app's state, session authentication, errors).
"""
