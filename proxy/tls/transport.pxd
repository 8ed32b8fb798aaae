# Declarations for the compiled module (setup.py): the class below as an extension type whose
# attributes are struct fields. The same names as its __slots__ in the .py (tests/test_build.py).
# Flags are C ints (bint): 4 bytes in the struct instead of an 8-byte reference each.
cdef class ByteStream:
    cdef public object _loop, _buf, _size, _waiter, _deadline, _timer
    cdef public object _drain_waiters, _ready, opened_at, _closed, peer
    cdef public bint _eof, _lost, _reading_paused, _write_paused

cdef class Stream(ByteStream):
    cdef public object transport
