"""The data plane: model runners, drafters and the pure speculation math.

Nothing in here imports Ray or gRPC; the cluster layer wraps these pieces in
actors and servers.
"""
