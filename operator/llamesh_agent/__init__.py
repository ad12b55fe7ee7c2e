"""The per-node agent: it keeps a working llama-server binary on this host and runs instances of it.

Each concern lives in its own module (building llama.cpp, supervising processes, ...); this package file
only names the package. It does no I/O at import time and starts no background work.
"""
