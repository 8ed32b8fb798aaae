# Declarations for the compiled module (setup.py): the class below as an extension type whose
# attributes are struct fields. The same names as its __slots__ in the .py (tests/test_build.py).
cdef class Entry:
    cdef public object client, method, target, version, host, status, bytes_sent
    cdef public object route, upstream, duration_ms
