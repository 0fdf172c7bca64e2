/*
 * Broker client: its connections.
 *
 * A small pool of connections guarded by one mutex; a thread takes a connection, runs its
 * request/response exchange alone on it and gives it back, so no connection ever carries
 * two threads' frames. Connections open lazily (never at provider load) and reopen after
 * any failure. Every wait is bounded by poll() against one deadline per call.
 *
 * Fork safety: a child must never speak on its parent's sockets (the broker would see two
 * writers interleaving frames on one stream). pthread_atfork resets every pool in the
 * child, closing the inherited descriptors without shutdown() so the parent's connection
 * stays intact; a pid check catches children made without the fork handlers.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "conn.h"
#include "debug.h"
#include "version.h"

#define CLIENT_NAME "tpmbroker-provider/" TPMBROKER_VERSION

static pthread_mutex_t clients_lock = PTHREAD_MUTEX_INITIALIZER;
static struct tpmb_client *clients;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

void set_err(CLIENT_ERR *err, int status, uint32_t tpm_rc, const char *fmt, ...)
{
    va_list ap;

    err->status = status;
    err->tpm_rc = tpm_rc;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof(err->message), fmt, ap);
    va_end(ap);
}

static void conn_forget_keys(struct conn *cn)
{
    OPENSSL_cleanse(cn->loaded, sizeof(cn->loaded));
    cn->nloaded = 0;
    cn->next_slot = 0;
}

void conn_close(struct conn *cn)
{
    if (cn->fd >= 0)
        close(cn->fd);
    cn->fd = -1;
    conn_forget_keys(cn);
}

/* Drops every inherited connection, closing only this process's copy of the socket. */
static void client_drop_inherited(struct tpmb_client *c)
{
    size_t i;

    for (i = 0; i < POOL_MAX; i++) {
        conn_close(&c->conns[i]);
        c->conns[i].busy = 0;
    }
    c->first = c->last = NULL; /* its waiters stayed in the parent */
    c->pid = getpid();
}

static void atfork_prepare(void)
{
    struct tpmb_client *c;

    pthread_mutex_lock(&clients_lock);
    for (c = clients; c != NULL; c = c->next)
        pthread_mutex_lock(&c->lock);
}

static void atfork_parent(void)
{
    struct tpmb_client *c;

    for (c = clients; c != NULL; c = c->next)
        pthread_mutex_unlock(&c->lock);
    pthread_mutex_unlock(&clients_lock);
}

/* The forking thread took every lock in prepare, so the child's only thread holds them. */
static void atfork_child(void)
{
    struct tpmb_client *c;

    for (c = clients; c != NULL; c = c->next) {
        client_drop_inherited(c);
        pthread_mutex_unlock(&c->lock);
    }
    pthread_mutex_unlock(&clients_lock);
}

static void register_atfork(void)
{
    /* glibc unregisters these when the module is unloaded (dlclose). */
    pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

TPMB_CLIENT *client_new(const char *socket_path, unsigned int timeout_ms)
{
    struct tpmb_client *c = calloc(1, sizeof(*c));
    size_t i;

    if (c == NULL)
        return NULL;
    c->path = strdup(socket_path);
    if (c->path == NULL) {
        free(c);
        return NULL;
    }
    c->timeout_ms = timeout_ms;
    pthread_mutex_init(&c->lock, NULL);
    c->pid = getpid();
    for (i = 0; i < POOL_MAX; i++)
        c->conns[i].fd = -1;
    pthread_once(&atfork_once, register_atfork);
    pthread_mutex_lock(&clients_lock);
    c->next = clients;
    clients = c;
    pthread_mutex_unlock(&clients_lock);
    return c;
}

void client_free(TPMB_CLIENT *c)
{
    struct tpmb_client **pp;
    size_t i;

    if (c == NULL)
        return;
    pthread_mutex_lock(&clients_lock);
    for (pp = &clients; *pp != NULL; pp = &(*pp)->next) {
        if (*pp == c) {
            *pp = c->next;
            break;
        }
    }
    pthread_mutex_unlock(&clients_lock);
    for (i = 0; i < POOL_MAX; i++) {
        conn_close(&c->conns[i]);
        free(c->conns[i].w);
        free(c->conns[i].rbuf);
    }
    pthread_mutex_destroy(&c->lock);
    free(c->path);
    free(c);
}

const char *client_socket_path(const TPMB_CLIENT *c)
{
    return c->path;
}

static void waiter_remove(struct tpmb_client *c, struct waiter *w)
{
    struct waiter **pp;

    for (pp = &c->first; *pp != NULL; pp = &(*pp)->next) {
        if (*pp == w) {
            *pp = w->next;
            break;
        }
    }
    if (c->last == w) {
        struct waiter *p;

        c->last = NULL;
        for (p = c->first; p != NULL; p = p->next)
            c->last = p;
    }
}

/* Caller holds the lock: an idle connection, preferring one that is open. */
static struct conn *conn_idle(struct tpmb_client *c)
{
    size_t i;

    for (i = 0; i < POOL_MAX; i++)
        if (!c->conns[i].busy && c->conns[i].fd >= 0)
            return &c->conns[i];
    for (i = 0; i < POOL_MAX; i++)
        if (!c->conns[i].busy)
            return &c->conns[i];
    return NULL;
}

/* Takes a free connection, waiting in turn for one until the deadline. */
struct conn *conn_acquire(struct tpmb_client *c, int64_t deadline, CLIENT_ERR *err)
{
    struct conn *cn = NULL;

    pthread_mutex_lock(&c->lock);
    if (c->pid != getpid())
        client_drop_inherited(c); /* forked without the fork handlers (raw clone) */
    if (c->first == NULL)
        cn = conn_idle(c);
    if (cn != NULL) {
        cn->busy = 1;
    } else {
        struct waiter w = { .given = NULL, .next = NULL };

        pthread_cond_init(&w.handed, NULL);
        if (c->last != NULL)
            c->last->next = &w;
        else
            c->first = &w;
        c->last = &w;
        while (w.given == NULL) {
            int64_t left = deadline - now_ms();
            struct timespec ts;

            if (left <= 0)
                break;
            clock_gettime(CLOCK_REALTIME, &ts);
            ts.tv_sec += left / 1000;
            ts.tv_nsec += (left % 1000) * 1000000;
            if (ts.tv_nsec >= 1000000000) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000;
            }
            pthread_cond_timedwait(&w.handed, &c->lock, &ts);
        }
        cn = w.given; /* handed over busy; the releaser took us off the list */
        if (cn == NULL)
            waiter_remove(c, &w);
        pthread_cond_destroy(&w.handed);
        if (cn == NULL) {
            pthread_mutex_unlock(&c->lock);
            set_err(err, CLIENT_E_TIMEOUT, 0,
                    "no connection to tpmbroker at %s became free in time", c->path);
            return NULL;
        }
    }
    pthread_mutex_unlock(&c->lock);
    if (cn->w == NULL)
        cn->w = malloc(sizeof(*cn->w));
    if (cn->rbuf == NULL)
        cn->rbuf = malloc(WIRE_MAX_FRAME);
    if (cn->w == NULL || cn->rbuf == NULL) {
        conn_release(c, cn);
        set_err(err, CLIENT_E_NOMEM, 0, "out of memory");
        return NULL;
    }
    return cn;
}

/* Hands the connection to the longest waiter, or makes it idle. */
void conn_release(struct tpmb_client *c, struct conn *cn)
{
    struct waiter *w;

    pthread_mutex_lock(&c->lock);
    w = c->first;
    if (w != NULL) {
        c->first = w->next;
        if (c->first == NULL)
            c->last = NULL;
        w->given = cn; /* stays busy: it changes hands */
        pthread_cond_signal(&w->handed);
    } else {
        cn->busy = 0;
    }
    pthread_mutex_unlock(&c->lock);
}

/* Waits for fd to become ready; 1 ready, 0 timed out, -1 error. */
static int wait_fd(int fd, short events, int64_t deadline)
{
    struct pollfd pfd;
    int64_t left;
    int r;

    for (;;) {
        left = deadline - now_ms();
        if (left <= 0)
            return 0;
        pfd.fd = fd;
        pfd.events = events;
        pfd.revents = 0;
        r = poll(&pfd, 1, left > 60000 ? 60000 : (int)left);
        if (r > 0)
            return 1; /* errors and hangups show up in the following read or write */
        if (r < 0 && errno != EINTR)
            return -1;
    }
}

static int send_all(struct tpmb_client *c, int fd, const uint8_t *p, size_t n, int64_t deadline,
                    CLIENT_ERR *err)
{
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);

        if (w > 0) {
            p += w;
            n -= (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            int r = wait_fd(fd, POLLOUT, deadline);

            if (r == 0) {
                set_err(err, CLIENT_E_TIMEOUT, 0,
                        "tpmbroker at %s did not take the request in time", c->path);
                return 0;
            }
            if (r > 0)
                continue;
        }
        set_err(err, CLIENT_E_IO, 0, "lost the connection to tpmbroker at %s: %s", c->path,
                strerror(errno));
        return 0;
    }
    return 1;
}

static int recv_all(struct tpmb_client *c, int fd, uint8_t *p, size_t n, int64_t deadline,
                    CLIENT_ERR *err)
{
    while (n > 0) {
        ssize_t r = recv(fd, p, n, 0);

        if (r > 0) {
            p += r;
            n -= (size_t)r;
            continue;
        }
        if (r == 0) {
            set_err(err, CLIENT_E_IO, 0, "tpmbroker at %s closed the connection", c->path);
            return 0;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            int w = wait_fd(fd, POLLIN, deadline);

            if (w == 0) {
                set_err(err, CLIENT_E_TIMEOUT, 0,
                        "tpmbroker at %s did not answer in time (raise `timeout` in the "
                        "provider's config section if the TPM is slow)", c->path);
                return 0;
            }
            if (w > 0)
                continue;
        }
        set_err(err, CLIENT_E_IO, 0, "lost the connection to tpmbroker at %s: %s", c->path,
                strerror(errno));
        return 0;
    }
    return 1;
}

/*
 * An idle connection is silent: one request at a time is in flight on it, and its answer
 * was read. Anything readable now is a frame no request asked for, or the broker's close;
 * either way the connection is not used again.
 */
int conn_unsolicited(struct conn *cn)
{
    struct pollfd pfd = { .fd = cn->fd, .events = POLLIN, .revents = 0 };

    return poll(&pfd, 1, 0) != 0;
}

/*
 * Sends the frame in cn->w and reads the matching response into cn->rbuf. On success the
 * reader is positioned at the response body. Any failure closes the connection: after a
 * timeout or a broken frame the stream can no longer be trusted.
 */
int conn_exchange(struct tpmb_client *c, struct conn *cn, size_t framelen,
                  int64_t deadline, WIRE_READER *body, CLIENT_ERR *err)
{
    WIRE_HEADER req, resp;
    size_t bodylen;

    wire_parse_header(cn->w->buf, &req);
    if (!send_all(c, cn->fd, cn->w->buf, framelen, deadline, err)) {
        /* The broker may have said why before it closed (a process it does not admit):
         * that answer is already here to read. Otherwise the send error stands. */
        CLIENT_ERR send_err = *err;
        int64_t grace = now_ms() + 200;

        if (!recv_all(c, cn->fd, cn->rbuf, WIRE_HEADER_SIZE,
                      grace < deadline ? grace : deadline, err)) {
            *err = send_err;
            goto fail;
        }
    } else if (!recv_all(c, cn->fd, cn->rbuf, WIRE_HEADER_SIZE, deadline, err)) {
        goto fail;
    }
    if (!wire_parse_header(cn->rbuf, &resp)) {
        set_err(err, CLIENT_E_PROTOCOL, 0, "tpmbroker at %s sent a frame of bad length %u",
                c->path, resp.length);
        goto fail;
    }
    bodylen = resp.length - (WIRE_HEADER_SIZE - 4);
    if (!recv_all(c, cn->fd, cn->rbuf + WIRE_HEADER_SIZE, bodylen, deadline, err))
        goto fail;
    if (resp.version != WIRE_VERSION || resp.flags != 0) {
        set_err(err, CLIENT_E_PROTOCOL, 0,
                "tpmbroker at %s speaks protocol version %u; this provider speaks %u",
                c->path, resp.version, WIRE_VERSION);
        goto fail;
    }
    wire_reader_init(body, cn->rbuf + WIRE_HEADER_SIZE, bodylen);
    if (resp.request_id == 0 && req.request_id != 0) {
        /* an error about the whole connection: the broker is closing the stream */
        uint32_t rc;
        WIRE_BYTES msg;
        int st = wire_response_status(body, &rc, &msg);

        set_err(err, st > 0 ? st : CLIENT_E_PROTOCOL, rc, "tpmbroker at %s %s: %.*s", c->path,
                st == WIRE_STATUS_PERMISSION_DENIED ? "does not admit this process (see its "
                "--allow-uid/--allow-gid)" : "rejected a frame",
                (int)msg.len, msg.p != NULL ? (const char *)msg.p : "");
        goto fail;
    }
    if (resp.request_id != req.request_id || resp.opcode != (req.opcode | WIRE_RESPONSE_BIT)) {
        set_err(err, CLIENT_E_PROTOCOL, 0,
                "tpmbroker at %s answered request %u/op 0x%02x to request %u/op 0x%02x",
                c->path, resp.request_id, resp.opcode, req.request_id, req.opcode);
        goto fail;
    }
    return 1;
fail:
    conn_close(cn);
    return 0;
}

/* A result that does not parse: the connection's framing is in doubt, so it goes. */
int malformed(struct tpmb_client *c, struct conn *cn, const char *what, CLIENT_ERR *err)
{
    set_err(err, CLIENT_E_PROTOCOL, 0, "tpmbroker at %s sent a malformed %s response",
            c->path, what);
    conn_close(cn);
    return 0;
}

/*
 * Reads the status of a response. Returns 1 for OK (reader at the result fields), 0 for a
 * broker refusal or a malformed body (err filled in).
 */
int response_ok(struct tpmb_client *c, struct conn *cn, WIRE_READER *body,
                const char *what, CLIENT_ERR *err)
{
    uint32_t rc;
    WIRE_BYTES msg;
    int st = wire_response_status(body, &rc, &msg);

    if (st == WIRE_STATUS_OK)
        return 1;
    if (st < 0)
        return malformed(c, cn, what, err);
    set_err(err, st, rc, "%.*s", (int)msg.len, (const char *)msg.p);
    if (st == WIRE_STATUS_SHUTTING_DOWN)
        conn_close(cn); /* this broker is going: the next request connects to its successor */
    return 0;
}

int pause_until(unsigned int ms, int64_t deadline)
{
    struct timespec ts;
    int64_t left = deadline - now_ms();

    if (left <= (int64_t)ms)
        return 0;
    ts.tv_sec = ms / 1000;
    ts.tv_nsec = (long)(ms % 1000) * 1000000L;
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
    return 1;
}

/*
 * A connected socket to the broker, or -1 (err filled in). On a Unix socket a connect that
 * fails with EAGAIN (the listen backlog is full, as when every nginx worker reconnects at
 * once) has not connected at all: it is tried again, until the deadline. A socket that is
 * away or refuses (ENOENT, ECONNREFUSED) is a broker restarting if this client reached one
 * before: it is waited for, RESTART_GRACE_MS at most.
 */
static int connect_socket(struct tpmb_client *c, const struct sockaddr_un *sa, int64_t deadline,
                          CLIENT_ERR *err)
{
    unsigned int delay = 1;
    int64_t away_since = 0;

    for (;;) {
        int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        int e;

        if (fd < 0) {
            set_err(err, CLIENT_E_CONNECT, 0, "cannot create a socket: %s", strerror(errno));
            return -1;
        }
        if (connect(fd, (const struct sockaddr *)sa, sizeof(*sa)) == 0)
            return fd;
        e = errno;
        close(fd);
        if (e == EAGAIN) {
            if (pause_until(delay, deadline)) {
                delay = delay < 50 ? delay * 2 : 50;
                continue;
            }
            e = ETIMEDOUT; /* the broker did not take the connection before the deadline */
        } else if ((e == ENOENT || e == ECONNREFUSED)
                   && __atomic_load_n(&c->reached, __ATOMIC_RELAXED)) {
            int64_t now = now_ms();

            if (away_since == 0)
                away_since = now;
            if (now - away_since < RESTART_GRACE_MS && pause_until(delay, deadline)) {
                tpmb_debug("tpmbroker at %s is away (%s): waiting for it", c->path,
                           strerror(e));
                delay = delay < RETRY_MAX_MS ? delay * 2 : RETRY_MAX_MS;
                continue;
            }
        }
        set_err(err, CLIENT_E_CONNECT, 0,
                "cannot reach tpmbroker at %s: %s: is `tpmbroker serve` running? "
                "(set TPMBROKER_SOCKET or `socket` in the provider's config section)",
                c->path, strerror(e));
        return -1;
    }
}

int conn_open(struct tpmb_client *c, struct conn *cn, int64_t deadline, CLIENT_ERR *err)
{
    struct sockaddr_un sa;
    WIRE_READER body;
    size_t n;
    int fd;

    if (strlen(c->path) >= sizeof(sa.sun_path)) {
        set_err(err, CLIENT_E_CONNECT, 0, "tpmbroker socket path too long: %s", c->path);
        return 0;
    }
    memset(&sa, 0, sizeof(sa));
    sa.sun_family = AF_UNIX;
    memcpy(sa.sun_path, c->path, strlen(c->path));
    fd = connect_socket(c, &sa, deadline, err);
    if (fd < 0)
        return 0;
    cn->fd = fd;
    cn->next_id = 0;
    conn_forget_keys(cn);
    n = wire_hello(cn->w, next_id(cn), remaining(deadline), CLIENT_NAME);
    if (!conn_exchange(c, cn, n, deadline, &body, err))
        return 0;
    if (!response_ok(c, cn, &body, "HELLO", err)) {
        conn_close(cn);
        return 0;
    }
    {
        uint8_t version = wire_get_u8(&body);
        WIRE_BYTES server = wire_get_bytes(&body);

        (void)wire_get_u32(&body);
        if (!wire_reader_done(&body) || version != WIRE_VERSION) {
            set_err(err, CLIENT_E_PROTOCOL, 0,
                    "tpmbroker at %s does not speak protocol version %u", c->path, WIRE_VERSION);
            conn_close(cn);
            return 0;
        }
        tpmb_debug("connected to %s (%.*s)", c->path, (int)server.len, (const char *)server.p);
    }
    __atomic_store_n(&c->reached, 1, __ATOMIC_RELAXED);
    return 1;
}

static struct loaded_key *conn_find_key(struct conn *cn, const CLIENT_KEY *key)
{
    size_t i;

    for (i = 0; i < cn->nloaded; i++) {
        struct loaded_key *lk = &cn->loaded[i];

        if (memcmp(lk->key_id, key->key_id, WIRE_KEY_ID_SIZE) == 0)
            return lk;
    }
    return NULL;
}

int conn_key_ready(struct conn *cn, const CLIENT_KEY *key)
{
    struct loaded_key *lk = conn_find_key(cn, key);

    /* the password is bound to the connection at LOAD: a different one needs a new LOAD */
    return lk != NULL && lk->authlen == key->authlen
           && CRYPTO_memcmp(lk->auth, key->auth, key->authlen) == 0;
}

void conn_note_key(struct conn *cn, const CLIENT_KEY *key)
{
    struct loaded_key *lk = conn_find_key(cn, key);

    if (key->authlen > AUTH_CACHE_MAX)
        return; /* not cached: LOADed again before each use */
    if (lk == NULL) {
        if (cn->nloaded < LOADED_MAX) {
            lk = &cn->loaded[cn->nloaded++];
        } else {
            lk = &cn->loaded[cn->next_slot];
            cn->next_slot = (cn->next_slot + 1) % LOADED_MAX;
        }
    }
    memcpy(lk->key_id, key->key_id, WIRE_KEY_ID_SIZE);
    OPENSSL_cleanse(lk->auth, sizeof(lk->auth));
    memcpy(lk->auth, key->auth, key->authlen);
    lk->authlen = key->authlen;
}

void conn_drop_key(struct conn *cn, const CLIENT_KEY *key)
{
    struct loaded_key *lk = conn_find_key(cn, key);

    if (lk == NULL)
        return;
    *lk = cn->loaded[--cn->nloaded];
    OPENSSL_cleanse(&cn->loaded[cn->nloaded], sizeof(cn->loaded[0]));
    if (cn->next_slot >= cn->nloaded)
        cn->next_slot = 0;
}
