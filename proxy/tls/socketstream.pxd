# Declarations for the compiled module (setup.py): the class below as an extension type whose
# attributes are struct fields. The same names as its __slots__ in the .py (tests/test_build.py).
# Flags and small numbers are C ints: 4 bytes in the struct instead of an 8-byte reference
# each, and no int object for a descriptor number above 256.
from proxy.tls.transport cimport ByteStream

cdef class TLSServerStream(ByteStream):
    cdef public object _new_connection, _prepare, _ssl, _out, _out_size
    cdef public object _waiting, _poller, _wprev, _wnext
    cdef public int _fd, _watching, _shutdown
    cdef public bint _handshaked, _read_needs_write, _write_needs_read, _closing
