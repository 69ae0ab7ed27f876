"""What processes share on disk: cross-process locks on files and folders (locks.py), the record
of which process wrote something and whether it still runs (processes.py), a file's sha256
read in chunks (checksum.py), what the user-level cache holds (cache.py), and a folder written
beside its destination and renamed into place (staging.py)."""
