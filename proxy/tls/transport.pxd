# Declarations for the compiled module (setup.py): the class below as an extension type whose
# attributes are struct fields. The same names as its __slots__ in the .py (tests/test_build.py).
cdef class ByteStream:
    cdef public object _loop, _buf, _size, _eof, _lost, _waiter, _deadline, _timer, _reading_paused
    cdef public object _write_paused, _drain_waiters, _ready, opened_at, _closed, peer

cdef class Stream(ByteStream):
    cdef public object transport
