/* tlsload: new-TLS-connection load generator for benchmarks/run.py.
 *
 * Each of -c worker processes loops for -d seconds over:
 *   TCP connect -> TLS handshake (with SNI) -> close_notify -> read to EOF -> close.
 * With -r (resumption on) a worker offers the session (TLS 1.3 ticket or TLS 1.2 session)
 * from its previous connection, so the server can resume; without -r every connection is a
 * full handshake. Reading to EOF after close_notify makes the client consume the TLS 1.3
 * NewSessionTicket messages the server sends after the handshake.
 *
 * Output (one line): "connections=N failures=F reused=R seconds=S"
 *
 * Build: cc -O2 -o tlsload tlsload.c -lssl -lcrypto
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int one_connection(SSL_CTX *ctx, struct sockaddr_in *sa, const char *sni,
                          SSL_SESSION **session, int reuse, int *reused) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) return -1;
    struct timeval tv = {5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    int on = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
    if (connect(fd, (struct sockaddr *)sa, sizeof *sa) < 0) { close(fd); return -1; }
    SSL *ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    if (sni && *sni) SSL_set_tlsext_host_name(ssl, sni);
    if (reuse && *session) SSL_set_session(ssl, *session);
    int ok = SSL_connect(ssl) == 1;
    if (ok) {
        *reused = SSL_session_reused(ssl);
        SSL_shutdown(ssl);
        char buf[4096];
        for (;;) {   /* read to EOF: consumes session tickets and the peer's close_notify */
            int n = SSL_read(ssl, buf, sizeof buf);
            if (n <= 0) break;
        }
        if (reuse) {
            SSL_SESSION *s = SSL_get1_session(ssl);
            if (s && SSL_SESSION_is_resumable(s)) {
                if (*session) SSL_SESSION_free(*session);
                *session = s;
            } else if (s) {
                SSL_SESSION_free(s);
            }
        }
    }
    SSL_free(ssl);
    close(fd);
    return ok ? 0 : -1;
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *sni = "localhost";
    int port = 0, conc = 4, reuse = 0;
    double duration = 5;
    int opt;
    while ((opt = getopt(argc, argv, "h:p:s:c:d:r")) != -1) {
        switch (opt) {
        case 'h': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 's': sni = optarg; break;
        case 'c': conc = atoi(optarg); break;
        case 'd': duration = atof(optarg); break;
        case 'r': reuse = 1; break;
        default:
            fprintf(stderr, "usage: %s -p PORT [-h HOST] [-s SNI] [-c PROCS] [-d SECONDS] [-r]\n", argv[0]);
            return 2;
        }
    }
    if (!port) { fprintf(stderr, "-p PORT required\n"); return 2; }
    signal(SIGPIPE, SIG_IGN);
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(port);
    inet_pton(AF_INET, host, &sa.sin_addr);

    int pipes[256][2];
    if (conc > 256) conc = 256;
    double start = now();
    for (int i = 0; i < conc; i++) {
        if (pipe(pipes[i]) < 0) return 1;
        pid_t pid = fork();
        if (pid == 0) {
            SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
            SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
            SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
            SSL_SESSION *session = NULL;
            long n = 0, fail = 0, reused_n = 0;
            double end = start + duration;
            while (now() < end) {
                int reused = 0;
                if (one_connection(ctx, &sa, sni, &session, reuse, &reused) == 0) {
                    n++;
                    reused_n += reused;
                } else {
                    fail++;
                    ERR_clear_error();
                }
            }
            char line[128];
            int len = snprintf(line, sizeof line, "%ld %ld %ld\n", n, fail, reused_n);
            if (write(pipes[i][1], line, len) < 0) _exit(1);
            _exit(0);
        }
        close(pipes[i][1]);
    }
    long total = 0, fails = 0, reused = 0;
    for (int i = 0; i < conc; i++) {
        char buf[128] = {0};
        ssize_t r = read(pipes[i][0], buf, sizeof buf - 1);
        long a = 0, b = 0, c = 0;
        if (r > 0) sscanf(buf, "%ld %ld %ld", &a, &b, &c);
        total += a; fails += b; reused += c;
        close(pipes[i][0]);
    }
    while (wait(NULL) > 0) {}
    printf("connections=%ld failures=%ld reused=%ld seconds=%.3f\n", total, fails, reused, now() - start);
    return 0;
}
