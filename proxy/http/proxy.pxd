# Declarations for the compiled module (setup.py): the class below as an extension type whose
# attributes are struct fields. The same names as its __slots__ in the .py (tests/test_build.py).
cdef class Side:
    cdef public object stream, conn, held

cdef class ClientConnection:
    cdef public object stream, get_state, scheme, busy, side, _close_gently
