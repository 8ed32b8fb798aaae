"""Runs acme2certifier's WSGI application on a threaded ``wsgiref`` server (its own
``acme2certifier_wsgi`` module, the same app its Apache/nginx deployments load).

Started by ``tests.infra.a2c`` with acme2certifier's own virtualenv's Python:
``python a2c_server.py PORT DNS_PORT`` with ``ACME_SRV_CONFIGFILE`` set. Name resolution for
validations goes to ``127.0.0.1:DNS_PORT`` (pebble-challtestsrv): acme2certifier resolves
with dnspython, which reads only /etc/resolv.conf and has no setting for the server's port.
"""
import sys

port, dns_port = int(sys.argv[1]), int(sys.argv[2])

import dns.resolver  # noqa: E402

_init = dns.resolver.Resolver.__init__


def _local_dns(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.nameservers = ["127.0.0.1"]
    self.port = dns_port


dns.resolver.Resolver.__init__ = _local_dns

from socketserver import ThreadingMixIn  # noqa: E402
from wsgiref.simple_server import WSGIServer, make_server  # noqa: E402

from acme2certifier.share import acme2certifier_wsgi as app  # noqa: E402


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


server = make_server("127.0.0.1", port, app.application, server_class=ThreadingWSGIServer,
                     handler_class=app.get_handler_cls())
print("ready", flush=True)
server.serve_forever()
