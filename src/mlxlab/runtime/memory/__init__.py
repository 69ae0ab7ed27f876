"""The process's memory: glibc's allocator kept from giving freed memory back while training,
and its arenas under an address-space limit (allocator.py); the limits set on the process, not
the machine's RAM (memory_limits.py: RLIMIT_AS, a cgroup's); MLX's file-reading threads, started
before such a limit makes late threads hang (io_threads.py)."""
