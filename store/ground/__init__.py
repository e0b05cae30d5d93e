"""The ground under ``ingest`` and ``query``: primitives both use, importing nothing else of Custody.

``errors`` (the one error tree), ``canonical`` (RFC 8785 and the event hash), ``jws`` (compact JWS), ``keys``
(JWK validation and the key ring), ``server_key`` (the server's signing key), ``layout`` (every path of a data
dir, and the one way to open one) and ``envelope`` (the one HTTP error envelope). ``tests/test_layers.py``
enforces that nothing here imports the layers above.
"""
