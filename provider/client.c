/*
 * Broker client.
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

#include "client.h"
#include "debug.h"
#include "version.h"

#define POOL_MAX 16
#define LOADED_MAX 16
#define AUTH_CACHE_MAX 128
#define CLIENT_NAME "tpmbroker-provider/" TPMBROKER_VERSION

/* A key this connection has LOADed, with the password it was loaded with. */
struct loaded_key {
    uint8_t key_id[WIRE_KEY_ID_SIZE];
    uint8_t auth[AUTH_CACHE_MAX];
    size_t authlen;
};

struct conn {
    int fd;               /* -1: not connected */
    int busy;             /* taken by a thread */
    uint32_t next_id;
    struct loaded_key loaded[LOADED_MAX];
    size_t nloaded;
    size_t next_slot;
    WIRE_WRITER *w;       /* request buffer */
    uint8_t *rbuf;        /* response buffer, WIRE_MAX_FRAME bytes */
};

/*
 * A thread waiting for a connection. A released connection is handed to the longest
 * waiter directly: a thread that releases and at once asks again must not overtake
 * threads already waiting (with 64 threads on 16 connections, some would starve).
 */
struct waiter {
    pthread_cond_t handed;
    struct conn *given;
    struct waiter *next;
};

struct tpmb_client {
    char *path;
    unsigned int timeout_ms;
    pthread_mutex_t lock;
    struct waiter *first, *last; /* FIFO of waiting threads */
    pid_t pid;
    struct conn conns[POOL_MAX];
    struct tpmb_client *next; /* all clients, for the fork handlers */
};

static pthread_mutex_t clients_lock = PTHREAD_MUTEX_INITIALIZER;
static struct tpmb_client *clients;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;

static void set_err(CLIENT_ERR *err, int status, uint32_t tpm_rc, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void set_err(CLIENT_ERR *err, int status, uint32_t tpm_rc, const char *fmt, ...)
{
    va_list ap;

    err->status = status;
    err->tpm_rc = tpm_rc;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof(err->message), fmt, ap);
    va_end(ap);
}

static int64_t now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void conn_forget_keys(struct conn *cn)
{
    OPENSSL_cleanse(cn->loaded, sizeof(cn->loaded));
    cn->nloaded = 0;
    cn->next_slot = 0;
}

static void conn_close(struct conn *cn)
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

static void conn_release(struct tpmb_client *c, struct conn *cn);

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
static struct conn *conn_acquire(struct tpmb_client *c, int64_t deadline, CLIENT_ERR *err)
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
static void conn_release(struct tpmb_client *c, struct conn *cn)
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
static int conn_unsolicited(struct conn *cn)
{
    struct pollfd pfd = { .fd = cn->fd, .events = POLLIN, .revents = 0 };

    return poll(&pfd, 1, 0) != 0;
}

static uint32_t remaining(int64_t deadline)
{
    int64_t left = deadline - now_ms();

    return left <= 0 ? 1 : (uint32_t)left;
}

/*
 * Sends the frame in cn->w and reads the matching response into cn->rbuf. On success the
 * reader is positioned at the response body. Any failure closes the connection: after a
 * timeout or a broken frame the stream can no longer be trusted.
 */
static int conn_exchange(struct tpmb_client *c, struct conn *cn, size_t framelen,
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
static int malformed(struct tpmb_client *c, struct conn *cn, const char *what, CLIENT_ERR *err)
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
static int response_ok(struct tpmb_client *c, struct conn *cn, WIRE_READER *body,
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

/* A byte field of a result, copied into a malloc'd buffer the caller frees. */
static int copy_out(WIRE_BYTES b, uint8_t **out, size_t *outlen, CLIENT_ERR *err)
{
    *out = malloc(b.len > 0 ? b.len : 1);
    if (*out == NULL) {
        set_err(err, CLIENT_E_NOMEM, 0, "out of memory");
        return 0;
    }
    if (b.len > 0)
        memcpy(*out, b.p, b.len);
    *outlen = b.len;
    return 1;
}

static uint32_t next_id(struct conn *cn)
{
    if (++cn->next_id == 0)
        cn->next_id = 1; /* 0 is what the broker uses for unframeable input */
    return cn->next_id;
}

static int conn_open(struct tpmb_client *c, struct conn *cn, int64_t deadline, CLIENT_ERR *err)
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
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0) {
        set_err(err, CLIENT_E_CONNECT, 0, "cannot create a socket: %s", strerror(errno));
        return 0;
    }
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
        int e = errno;

        if (e == EAGAIN || e == EINPROGRESS) {
            /* listen backlog full: wait for the broker to accept, up to the deadline */
            socklen_t len = sizeof(e);

            if (wait_fd(fd, POLLOUT, deadline) <= 0)
                e = ETIMEDOUT;
            else if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &e, &len) != 0)
                e = errno;
        }
        if (e != 0) {
            close(fd);
            set_err(err, CLIENT_E_CONNECT, 0,
                    "cannot reach tpmbroker at %s: %s: is `tpmbroker serve` running? "
                    "(set TPMBROKER_SOCKET or `socket` in the provider's config section)",
                    c->path, strerror(e));
            return 0;
        }
    }
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

static int conn_key_ready(struct conn *cn, const CLIENT_KEY *key)
{
    struct loaded_key *lk = conn_find_key(cn, key);

    /* the password is bound to the connection at LOAD: a different one needs a new LOAD */
    return lk != NULL && lk->authlen == key->authlen
           && CRYPTO_memcmp(lk->auth, key->auth, key->authlen) == 0;
}

static void conn_note_key(struct conn *cn, const CLIENT_KEY *key)
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

static void conn_drop_key(struct conn *cn, const CLIENT_KEY *key)
{
    struct loaded_key *lk = conn_find_key(cn, key);

    if (lk == NULL)
        return;
    *lk = cn->loaded[--cn->nloaded];
    OPENSSL_cleanse(&cn->loaded[cn->nloaded], sizeof(cn->loaded[0]));
    if (cn->next_slot >= cn->nloaded)
        cn->next_slot = 0;
}

/* LOAD on this connection; fills out when not NULL. */
static int conn_load(struct tpmb_client *c, struct conn *cn, const CLIENT_KEY *key,
                     int64_t deadline, CLIENT_LOAD_RESULT *out, CLIENT_ERR *err)
{
    WIRE_READER body;
    WIRE_BYTES id, spki;
    uint8_t type;
    uint16_t bits, curve;
    size_t n;

    n = wire_load_parent(cn->w, next_id(cn), remaining(deadline), key->source, key->blob,
                         key->bloblen, key->auth, key->authlen, key->parent_auth,
                         key->parent_authlen);
    if (n == 0) {
        set_err(err, CLIENT_E_ARG, 0, "key blob of %zu bytes does not fit in a frame",
                key->bloblen);
        return 0;
    }
    if (!conn_exchange(c, cn, n, deadline, &body, err))
        return 0;
    if (!response_ok(c, cn, &body, "LOAD", err))
        return 0;
    id = wire_get_bytes(&body);
    type = wire_get_u8(&body);
    bits = wire_get_u16(&body);
    curve = wire_get_u16(&body);
    spki = wire_get_bytes(&body);
    if (!wire_reader_done(&body) || id.len != WIRE_KEY_ID_SIZE)
        return malformed(c, cn, "LOAD", err);
    if (memcmp(id.p, key->key_id, WIRE_KEY_ID_SIZE) != 0) {
        set_err(err, CLIENT_E_PROTOCOL, 0,
                "tpmbroker at %s computed another key id than this provider", c->path);
        return 0;
    }
    conn_note_key(cn, key);
    if (out != NULL) {
        memcpy(out->key_id, id.p, WIRE_KEY_ID_SIZE);
        out->key_type = type;
        out->bits = bits;
        out->curve = curve;
        out->spki = malloc(spki.len > 0 ? spki.len : 1);
        if (out->spki == NULL) {
            set_err(err, CLIENT_E_NOMEM, 0, "out of memory");
            return 0;
        }
        memcpy(out->spki, spki.p, spki.len);
        out->spkilen = spki.len;
    }
    return 1;
}

/*
 * Runs op on a pooled connection. A reused connection may have died with a restarted broker:
 * if it fails before any answer came, one fresh connection gets one more try. UNKNOWN_KEY
 * (a broker that forgot the key) is answered with LOAD and one retry.
 */
typedef int (*conn_op)(struct tpmb_client *c, struct conn *cn, int64_t deadline, void *arg,
                       CLIENT_ERR *err);

static int run(struct tpmb_client *c, unsigned int timeout_ms, conn_op op, void *arg,
               CLIENT_ERR *err)
{
    int64_t deadline = now_ms() + timeout_ms;
    struct conn *cn = conn_acquire(c, deadline, err);
    int attempt, ok = 0, reloaded = 0;

    if (cn == NULL)
        return 0;
    for (attempt = 0; attempt < 3; attempt++) {
        int fresh = 0;

        if (cn->fd >= 0 && conn_unsolicited(cn)) {
            tpmb_debug("dropping a connection to %s that carries data no request asked for "
                       "(or was closed)", c->path);
            conn_close(cn);
        }
        if (cn->fd < 0) {
            if (!conn_open(c, cn, deadline, err))
                break;
            fresh = 1;
        }
        ok = op(c, cn, deadline, arg, err);
        if (ok)
            break;
        if (err->status == CLIENT_E_IO && !fresh)
            continue; /* stale connection: cn was closed, reconnect */
        if (err->status == WIRE_STATUS_UNKNOWN_KEY && !reloaded) {
            reloaded = 1;
            continue; /* op dropped the key from the cache: it LOADs again */
        }
        break;
    }
    conn_release(c, cn);
    return ok;
}

struct load_arg {
    const CLIENT_KEY *key;
    CLIENT_LOAD_RESULT *out;
};

/* The answer to an operation on a loaded key: one sized field. A key the broker no longer
 * knows is dropped from the connection, so that run()'s retry loads it again. */
static int key_answer(struct tpmb_client *c, struct conn *cn, const CLIENT_KEY *key, size_t n,
                      int64_t deadline, const char *op, WIRE_READER *body, WIRE_BYTES *field,
                      CLIENT_ERR *err)
{
    if (!conn_exchange(c, cn, n, deadline, body, err))
        return 0;
    if (!response_ok(c, cn, body, op, err)) {
        if (err->status == WIRE_STATUS_UNKNOWN_KEY)
            conn_drop_key(cn, key);
        return 0;
    }
    *field = wire_get_bytes(body);
    if (!wire_reader_done(body))
        return malformed(c, cn, op, err);
    return 1;
}

/* Copies a field into the caller's buffer of *len bytes; `what` names it in the error. */
static int copy_into(WIRE_BYTES b, uint8_t *out, size_t *len, const char *what, CLIENT_ERR *err)
{
    if (b.len > *len) {
        set_err(err, CLIENT_E_ARG, 0, "%s of %zu bytes exceeds the buffer of %zu", what, b.len,
                *len);
        return 0;
    }
    memcpy(out, b.p, b.len);
    *len = b.len;
    return 1;
}

static int op_load(struct tpmb_client *c, struct conn *cn, int64_t deadline, void *arg,
                   CLIENT_ERR *err)
{
    struct load_arg *a = arg;

    return conn_load(c, cn, a->key, deadline, a->out, err);
}

int client_load(TPMB_CLIENT *c, const CLIENT_KEY *key, CLIENT_LOAD_RESULT *out, CLIENT_ERR *err)
{
    struct load_arg a = { key, out };

    memset(out, 0, sizeof(*out));
    return run(c, c->timeout_ms, op_load, &a, err);
}

struct sign_arg {
    const CLIENT_KEY *key;
    uint8_t scheme;
    uint16_t hash;
    const uint8_t *digest; /* or the message, for SIGN_MESSAGE */
    size_t digestlen;
    uint8_t *sig;
    size_t *siglen;
    int message;           /* SIGN_MESSAGE: the broker (or the TPM) hashes */
};

static int op_sign(struct tpmb_client *c, struct conn *cn, int64_t deadline, void *arg,
                   CLIENT_ERR *err)
{
    struct sign_arg *a = arg;
    WIRE_READER body;
    WIRE_BYTES sig;
    size_t n;

    if (!conn_key_ready(cn, a->key) && !conn_load(c, cn, a->key, deadline, NULL, err))
        return 0;
    n = a->message ? wire_sign_message(cn->w, next_id(cn), remaining(deadline),
                                       a->key->key_id, WIRE_KEY_ID_SIZE, a->scheme, a->hash,
                                       a->digest, a->digestlen)
                   : wire_sign(cn->w, next_id(cn), remaining(deadline), a->key->key_id,
                               WIRE_KEY_ID_SIZE, a->scheme, a->hash, a->digest, a->digestlen);
    if (n == 0) {
        if (a->message)
            set_err(err, CLIENT_E_ARG, 0, "message of %zu bytes: a restricted key signs at "
                    "most %u bytes, which the TPM hashes (MAX_MESSAGE)", a->digestlen,
                    (unsigned int)WIRE_MAX_MESSAGE);
        else
            set_err(err, CLIENT_E_ARG, 0, "digest too large");
        return 0;
    }
    return key_answer(c, cn, a->key, n, deadline, a->message ? "SIGN_MESSAGE" : "SIGN", &body,
                      &sig, err)
           && copy_into(sig, a->sig, a->siglen, "signature", err);
}

int client_sign(TPMB_CLIENT *c, const CLIENT_KEY *key, uint8_t scheme, uint16_t hash,
                const uint8_t *digest, size_t digestlen, uint8_t *sig, size_t *siglen,
                CLIENT_ERR *err)
{
    struct sign_arg a = { key, scheme, hash, digest, digestlen, sig, siglen, 0 };

    return run(c, c->timeout_ms, op_sign, &a, err);
}

int client_sign_message(TPMB_CLIENT *c, const CLIENT_KEY *key, uint8_t scheme, uint16_t hash,
                        const uint8_t *message, size_t messagelen, uint8_t *sig,
                        size_t *siglen, CLIENT_ERR *err)
{
    struct sign_arg a = { key, scheme, hash, message, messagelen, sig, siglen, 1 };

    return run(c, c->timeout_ms, op_sign, &a, err);
}

struct generate_arg {
    const CLIENT_KEYGEN *req;
    uint8_t **key;
    size_t *keylen;
};

static int op_generate(struct tpmb_client *c, struct conn *cn, int64_t deadline, void *arg,
                       CLIENT_ERR *err)
{
    struct generate_arg *a = arg;
    WIRE_READER body;
    WIRE_BYTES key;
    size_t n;

    n = wire_generate(cn->w, next_id(cn), remaining(deadline), a->req->key_type,
                      a->req->param, a->req->auth, a->req->authlen, a->req->parent,
                      a->req->usage, a->req->hash, a->req->parent_auth,
                      a->req->parent_authlen);
    if (n == 0) {
        set_err(err, CLIENT_E_ARG, 0, "password too long");
        return 0;
    }
    if (!conn_exchange(c, cn, n, deadline, &body, err))
        return 0;
    if (!response_ok(c, cn, &body, "GENERATE", err))
        return 0;
    key = wire_get_bytes(&body);
    (void)wire_get_bytes(&body); /* the public key comes again with LOAD */
    if (!wire_reader_done(&body) || key.len == 0)
        return malformed(c, cn, "GENERATE", err);
    return copy_out(key, a->key, a->keylen, err);
}

int client_generate(TPMB_CLIENT *c, const CLIENT_KEYGEN *req, uint8_t **key, size_t *keylen,
                    CLIENT_ERR *err)
{
    struct generate_arg a = { req, key, keylen };
    /* RSA key generation on a TPM can take tens of seconds */
    unsigned int timeout_ms = c->timeout_ms > 120000 ? c->timeout_ms : 120000;

    return run(c, timeout_ms, op_generate, &a, err);
}

/* --- RANDOM ----------------------------------------------------------------------------- */

struct random_arg {
    uint8_t *out;
    size_t n;
    size_t done; /* kept across a retry on a fresh connection */
};

static int op_random(struct tpmb_client *c, struct conn *cn, int64_t deadline, void *arg,
                     CLIENT_ERR *err)
{
    struct random_arg *a = arg;

    while (a->done < a->n) {
        size_t want = a->n - a->done, n;
        WIRE_READER body;
        WIRE_BYTES got;

        if (want > WIRE_MAX_RANDOM)
            want = WIRE_MAX_RANDOM;
        n = wire_random(cn->w, next_id(cn), remaining(deadline), (uint16_t)want);
        if (!conn_exchange(c, cn, n, deadline, &body, err))
            return 0;
        if (!response_ok(c, cn, &body, "RANDOM", err))
            return 0;
        got = wire_get_bytes(&body);
        if (!wire_reader_done(&body) || got.len != want)
            return malformed(c, cn, "RANDOM", err);
        memcpy(a->out + a->done, got.p, got.len);
        OPENSSL_cleanse(cn->rbuf, WIRE_HEADER_SIZE + body.len);
        a->done += got.len;
    }
    return 1;
}

int client_random(TPMB_CLIENT *c, uint8_t *out, size_t n, CLIENT_ERR *err)
{
    struct random_arg a = { out, n, 0 };

    return run(c, c->timeout_ms, op_random, &a, err);
}

struct nv_read_arg {
    uint32_t index;
    uint8_t **data;
    size_t *len;
};

static int op_nv_read(struct tpmb_client *c, struct conn *cn, int64_t deadline, void *arg,
                      CLIENT_ERR *err)
{
    struct nv_read_arg *a = arg;
    WIRE_READER body;
    WIRE_BYTES got;
    size_t n = wire_nv_read(cn->w, next_id(cn), remaining(deadline), a->index);

    if (!conn_exchange(c, cn, n, deadline, &body, err))
        return 0;
    if (!response_ok(c, cn, &body, "NV_READ", err))
        return 0;
    got = wire_get_bytes(&body);
    if (!wire_reader_done(&body))
        return malformed(c, cn, "NV_READ", err);
    return copy_out(got, a->data, a->len, err);
}

int client_nv_read(TPMB_CLIENT *c, uint32_t index, uint8_t **data, size_t *len,
                   CLIENT_ERR *err)
{
    struct nv_read_arg a = { index, data, len };

    return run(c, c->timeout_ms, op_nv_read, &a, err);
}

struct derive_arg {
    const CLIENT_KEY *key;
    const uint8_t *point;
    size_t pointlen;
    uint8_t *secret;
    size_t *secretlen;
};

static int op_derive(struct tpmb_client *c, struct conn *cn, int64_t deadline, void *arg,
                     CLIENT_ERR *err)
{
    struct derive_arg *a = arg;
    WIRE_READER body;
    WIRE_BYTES z;
    size_t n;
    int ok;

    if (!conn_key_ready(cn, a->key) && !conn_load(c, cn, a->key, deadline, NULL, err))
        return 0;
    n = wire_derive(cn->w, next_id(cn), remaining(deadline), a->key->key_id, WIRE_KEY_ID_SIZE,
                    a->point, a->pointlen);
    if (n == 0) {
        set_err(err, CLIENT_E_ARG, 0, "peer point too large");
        return 0;
    }
    ok = key_answer(c, cn, a->key, n, deadline, "DERIVE", &body, &z, err)
         && copy_into(z, a->secret, a->secretlen, "shared secret", err);
    OPENSSL_cleanse(cn->rbuf, WIRE_MAX_FRAME); /* no shared secret left behind, even half read */
    return ok;
}

int client_derive(TPMB_CLIENT *c, const CLIENT_KEY *key, const uint8_t *point, size_t pointlen,
                  uint8_t *secret, size_t *secretlen, CLIENT_ERR *err)
{
    struct derive_arg a = { key, point, pointlen, secret, secretlen };

    return run(c, c->timeout_ms, op_derive, &a, err);
}

/* --- DECRYPT ---------------------------------------------------------------------------- */

struct decrypt_arg {
    const CLIENT_KEY *key;
    WIRE_DECRYPT_REQUEST *d;
    uint8_t *out;
    size_t *outlen;
};

static int op_decrypt(struct tpmb_client *c, struct conn *cn, int64_t deadline, void *arg,
                      CLIENT_ERR *err)
{
    struct decrypt_arg *a = arg;
    WIRE_READER body;
    WIRE_BYTES got;
    size_t n;
    int ok;

    if (!conn_key_ready(cn, a->key) && !conn_load(c, cn, a->key, deadline, NULL, err))
        return 0;
    a->d->key_id = a->key->key_id;
    n = wire_decrypt(cn->w, next_id(cn), remaining(deadline), a->d);
    if (n == 0) {
        set_err(err, CLIENT_E_ARG, 0, "ciphertext or label too large");
        return 0;
    }
    ok = key_answer(c, cn, a->key, n, deadline, "DECRYPT", &body, &got, err)
         && copy_into(got, a->out, a->outlen, "plaintext", err);
    OPENSSL_cleanse(cn->rbuf, WIRE_MAX_FRAME); /* no plaintext left behind, even half read */
    return ok;
}

int client_decrypt(TPMB_CLIENT *c, const CLIENT_KEY *key, WIRE_DECRYPT_REQUEST *d,
                   uint8_t *out, size_t *outlen, CLIENT_ERR *err)
{
    struct decrypt_arg a = { key, d, out, outlen };

    return run(c, c->timeout_ms, op_decrypt, &a, err);
}
