# Declarations for the compiled module (setup.py): the class below as an extension type whose
# attributes are struct fields. The same names as its __slots__ in the .py (tests/test_build.py).
cdef class Connection:
    cdef public object our_role, their_role, _max, _receive_buffer, _pending, _receive_buffer_closed
    cdef public object _search_from, their_http_version, _request_method, client_is_waiting_for_100_continue
    cdef public object _cstate, _sstate, _keep_alive, _switch_upgrade, _switch_connect, _plain, _rkind, _rleft
    cdef public object _rchunk_phase, _wkind, _wleft
