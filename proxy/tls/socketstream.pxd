# Declarations for the compiled module (setup.py): the class below as an extension type whose
# attributes are struct fields. The same names as its __slots__ in the .py (tests/test_build.py).
from proxy.tls.transport cimport ByteStream

cdef class TLSServerStream(ByteStream):
    cdef public object _new_connection, _prepare, _ssl, _fd, _handshaked
    cdef public object _watching, _read_needs_write, _write_needs_read, _out, _out_size
    cdef public object _closing, _shutdown, _start, _waiting, _poller, _wprev, _wnext
