"""Task payloads, shared by the client and the workers (never the scheduler, which moves
them as opaque bytes): pickling with out-of-band buffers, task exceptions, and shared
memory segments for data that several workers of one machine map."""
