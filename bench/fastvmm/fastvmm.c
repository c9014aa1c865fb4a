/*
 * fastvmm: a small, fast stand-in for cloud-hypervisor, for benchmarks only.
 *
 * It speaks the REST API the node agent uses (HTTP/1.1 with keep-alive on a unix socket)
 * and writes the --event-monitor file the way cloud-hypervisor v54 does, so benchmarks
 * measure the operator rather than a VMM. It runs no guest and needs no /dev/kvm. The
 * faithful test double is reconcilers/testing/chdouble.py; this one keeps only what a
 * normal lifecycle needs:
 *
 *   GET  vmm.ping, vm.info (404 "VM is not created" before vm.create), vm.counters
 *   PUT  vm.create (the body kept as given), vm.boot, vm.pause, vm.resume, vm.shutdown
 *        (back to Created, as upstream), vm.reboot, vm.delete, vm.resize, vm.resize-disk,
 *        vm.resize-zone, vm.add-{disk,net,fs,pmem,device,vdpa,user-device,vsock},
 *        vm.remove-device, vm.snapshot / vm.restore (config.json, state.json and
 *        memory-ranges in the directory), vm.power-button, vm.nmi, vmm.shutdown (exits).
 *
 * Answers as upstream: 204 for actions, 200 + JSON for queries, errors as a JSON array of
 * strings (["Error from API", ...]); routing errors ["Not Found"] / ["Bad Request"].
 * Signals: SIGTERM/SIGINT exit; SIGUSR1 the guest powers off (the VMM exits, as upstream);
 * SIGUSR2 the guest reboots. Single-threaded: one poll() loop.
 *
 * Usage: fastvmm --api-socket path=<sock> [--event-monitor path=<file>|fd=<n>] [ignored...]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define VERSION "54.0.0"
#define BUILD_VERSION "v54.0.0-fastvmm"
#define API_PREFIX "/api/v1/"
#define MAX_BODY (4u << 20)
#define MAX_HEADER (64u << 10)
#define DEFAULT_MEMORY 536870912LL

/* ------------------------------------------------------------------ buffers */

typedef struct {
    char *p;
    size_t n, cap;
} buf;

static void bgrow(buf *b, size_t extra) {
    if (b->n + extra + 1 <= b->cap) return;
    size_t c = b->cap ? b->cap : 256;
    while (c < b->n + extra + 1) c *= 2;
    char *p = realloc(b->p, c);
    if (!p) abort();
    b->p = p;
    b->cap = c;
}

static void bput(buf *b, const char *s, size_t n) {
    bgrow(b, n);
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = 0;
}

static void bputs(buf *b, const char *s) { bput(b, s, strlen(s)); }

static void bprintf(buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void bprintf(buf *b, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (k < 0) return;
    bgrow(b, (size_t)k);
    va_start(ap, fmt);
    vsnprintf(b->p + b->n, (size_t)k + 1, fmt, ap);
    va_end(ap);
    b->n += (size_t)k;
}

static void bconsume(buf *b, size_t k) {
    memmove(b->p, b->p + k, b->n - k);
    b->n -= k;
    if (b->p) b->p[b->n] = 0;
}

static void bfree(buf *b) {
    free(b->p);
    b->p = NULL;
    b->n = b->cap = 0;
}

/* JSON string literal of s (quotes included). */
static void bquote(buf *b, const char *s) {
    bputs(b, "\"");
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            char e[2] = {'\\', (char)c};
            bput(b, e, 2);
        } else if (c == '\n') {
            bputs(b, "\\n");
        } else if (c < 0x20) {
            bprintf(b, "\\u%04x", c);
        } else {
            bput(b, (const char *)&c, 1);
        }
    }
    bputs(b, "\"");
}

/* ------------------------------------------------------------------ JSON */
/* A small DOM that keeps each scalar's text (and each key's) as given, so a config
 * stored by vm.create is echoed back by vm.info as it came, order included. */

enum jt { J_NULL, J_BOOL, J_NUM, J_STR, J_ARR, J_OBJ };

typedef struct json json;
struct json {
    enum jt t;
    char *raw;   /* scalars: the token's text (strings with their quotes) */
    size_t n, cap;
    char **keys; /* objects: raw key tokens, quotes included */
    json **vals; /* arrays and objects */
};

static json *jnew(enum jt t) {
    json *j = calloc(1, sizeof *j);
    if (!j) abort();
    j->t = t;
    return j;
}

static void jfree(json *j) {
    if (!j) return;
    for (size_t i = 0; i < j->n; i++) {
        if (j->keys) free(j->keys[i]);
        jfree(j->vals[i]);
    }
    free(j->keys);
    free(j->vals);
    free(j->raw);
    free(j);
}

static void jappend(json *j, char *key, json *v) {
    if (j->n == j->cap) {
        j->cap = j->cap ? j->cap * 2 : 8;
        j->vals = realloc(j->vals, j->cap * sizeof *j->vals);
        if (j->t == J_OBJ) j->keys = realloc(j->keys, j->cap * sizeof *j->keys);
        if (!j->vals || (j->t == J_OBJ && !j->keys)) abort();
    }
    if (j->t == J_OBJ) j->keys[j->n] = key;
    j->vals[j->n++] = v;
}

typedef struct {
    const char *s;
    size_t i, n;
    const char *err;
    int depth;
} jparser;

static void jws(jparser *p) {
    while (p->i < p->n && (p->s[p->i] == ' ' || p->s[p->i] == '\t' || p->s[p->i] == '\n' ||
                           p->s[p->i] == '\r'))
        p->i++;
}

static char *jdup(const char *s, size_t n) {
    char *r = malloc(n + 1);
    if (!r) abort();
    memcpy(r, s, n);
    r[n] = 0;
    return r;
}

/* The string token at p->i (which is '"'), quotes included. */
static char *jstring_token(jparser *p) {
    size_t start = p->i++;
    while (p->i < p->n) {
        unsigned char c = (unsigned char)p->s[p->i];
        if (c == '"') {
            p->i++;
            return jdup(p->s + start, p->i - start);
        }
        if (c == '\\') {
            p->i += 2;
            continue;
        }
        if (c < 0x20) {
            p->err = "control character (\\u0000-\\u001F) found while parsing a string";
            return NULL;
        }
        p->i++;
    }
    p->err = "EOF while parsing a string";
    return NULL;
}

static json *jvalue(jparser *p);

static json *jcontainer(jparser *p, int obj) {
    json *j = jnew(obj ? J_OBJ : J_ARR);
    char close = obj ? '}' : ']';
    p->i++;
    jws(p);
    if (p->i < p->n && p->s[p->i] == close) {
        p->i++;
        return j;
    }
    for (;;) {
        char *key = NULL;
        jws(p);
        if (obj) {
            if (p->i >= p->n) {
                p->err = "EOF while parsing an object";
                goto fail;
            }
            if (p->s[p->i] != '"') {
                p->err = "key must be a string";
                goto fail;
            }
            if (!(key = jstring_token(p))) goto fail;
            jws(p);
            if (p->i >= p->n || p->s[p->i] != ':') {
                free(key);
                p->err = p->i >= p->n ? "EOF while parsing an object" : "expected `:`";
                goto fail;
            }
            p->i++;
        }
        json *v = jvalue(p);
        if (!v) {
            free(key);
            goto fail;
        }
        jappend(j, key, v);
        jws(p);
        if (p->i >= p->n) {
            p->err = obj ? "EOF while parsing an object" : "EOF while parsing a list";
            goto fail;
        }
        if (p->s[p->i] == ',') {
            p->i++;
            continue;
        }
        if (p->s[p->i] == close) {
            p->i++;
            return j;
        }
        p->err = obj ? "expected `,` or `}`" : "expected `,` or `]`";
        goto fail;
    }
fail:
    jfree(j);
    return NULL;
}

static json *jvalue(jparser *p) {
    jws(p);
    if (p->i >= p->n) {
        p->err = "EOF while parsing a value";
        return NULL;
    }
    if (++p->depth > 128) {
        p->err = "recursion limit exceeded";
        return NULL;
    }
    json *j = NULL;
    char c = p->s[p->i];
    if (c == '{' || c == '[') {
        j = jcontainer(p, c == '{');
    } else if (c == '"') {
        char *raw = jstring_token(p);
        if (raw) {
            j = jnew(J_STR);
            j->raw = raw;
        }
    } else if (c == '-' || (c >= '0' && c <= '9')) {
        size_t start = p->i;
        while (p->i < p->n && strchr("+-0123456789.eE", p->s[p->i]) && p->s[p->i]) p->i++;
        j = jnew(J_NUM);
        j->raw = jdup(p->s + start, p->i - start);
    } else {
        static const char *lits[] = {"true", "false", "null"};
        for (int k = 0; k < 3; k++) {
            size_t len = strlen(lits[k]);
            if (p->n - p->i >= len && !memcmp(p->s + p->i, lits[k], len)) {
                j = jnew(k == 2 ? J_NULL : J_BOOL);
                j->raw = jdup(lits[k], len);
                p->i += len;
                break;
            }
        }
        if (!j) p->err = "expected value";
    }
    p->depth--;
    return j;
}

/* Parse a whole document; on failure *err says what and where, serde-style. */
static json *jparse(const char *s, size_t n, char *err, size_t errlen) {
    jparser p = {s, 0, n, NULL, 0};
    json *j = jvalue(&p);
    if (j) {
        jws(&p);
        if (p.i < p.n) {
            p.err = "trailing characters";
            jfree(j);
            j = NULL;
        }
    }
    if (!j) {
        int line = 1, col = 0;
        size_t upto = p.i < n ? p.i + 1 : n;
        for (size_t k = 0; k < upto; k++) {
            if (s[k] == '\n') {
                line++;
                col = 0;
            } else {
                col++;
            }
        }
        snprintf(err, errlen, "%s at line %d column %d", p.err ? p.err : "invalid JSON", line,
                 col);
    }
    return j;
}

static void jdump(buf *b, const json *j) {
    switch (j->t) {
    case J_ARR:
    case J_OBJ:
        bputs(b, j->t == J_OBJ ? "{" : "[");
        for (size_t i = 0; i < j->n; i++) {
            if (i) bputs(b, ",");
            if (j->t == J_OBJ) {
                bputs(b, j->keys[i]);
                bputs(b, ":");
            }
            jdump(b, j->vals[i]);
        }
        bputs(b, j->t == J_OBJ ? "}" : "]");
        break;
    default:
        bputs(b, j->raw);
    }
}

static int jkey_is(const char *raw, const char *name) {
    size_t len = strlen(name);
    return strlen(raw) == len + 2 && !memcmp(raw + 1, name, len);
}

static json *jget(const json *o, const char *name) {
    if (!o || o->t != J_OBJ) return NULL;
    for (size_t i = 0; i < o->n; i++)
        if (jkey_is(o->keys[i], name)) return o->vals[i];
    return NULL;
}

static void jremove_at(json *j, size_t i) {
    if (j->keys) free(j->keys[i]);
    jfree(j->vals[i]);
    for (size_t k = i + 1; k < j->n; k++) {
        if (j->keys) j->keys[k - 1] = j->keys[k];
        j->vals[k - 1] = j->vals[k];
    }
    j->n--;
}

/* Set (replace or append) key name of object o to v; o owns v afterwards. */
static void jset(json *o, const char *name, json *v) {
    for (size_t i = 0; i < o->n; i++) {
        if (jkey_is(o->keys[i], name)) {
            jfree(o->vals[i]);
            o->vals[i] = v;
            return;
        }
    }
    buf k = {0};
    bquote(&k, name);
    jappend(o, k.p, v);
}

static json *jnum(long long v) {
    json *j = jnew(J_NUM);
    char tmp[32];
    snprintf(tmp, sizeof tmp, "%lld", v);
    j->raw = jdup(tmp, strlen(tmp));
    return j;
}

static json *jstrv(const char *s) {
    json *j = jnew(J_STR);
    buf b = {0};
    bquote(&b, s);
    j->raw = b.p;
    return j;
}

static json *jparse_str(const char *text) {
    char err[160];
    return jparse(text, strlen(text), err, sizeof err);
}

static long long jint(const json *v, long long dflt) {
    if (!v || v->t != J_NUM) return dflt;
    if (strpbrk(v->raw, ".eE")) return (long long)strtod(v->raw, NULL);
    return strtoll(v->raw, NULL, 10);
}

static int jtrue(const json *v) { return v && v->t == J_BOOL && v->raw[0] == 't'; }

/* The unescaped text of a string value (malloc'd), or NULL. */
static char *jstr(const json *v) {
    if (!v || v->t != J_STR) return NULL;
    const char *s = v->raw + 1;
    size_t len = strlen(v->raw) - 2;
    buf out = {0};
    bgrow(&out, len);
    for (size_t i = 0; i < len; i++) {
        char c = s[i];
        if (c != '\\' || i + 1 >= len) {
            bput(&out, &c, 1);
            continue;
        }
        c = s[++i];
        switch (c) {
        case 'n': bputs(&out, "\n"); break;
        case 't': bputs(&out, "\t"); break;
        case 'r': bputs(&out, "\r"); break;
        case 'b': bputs(&out, "\b"); break;
        case 'f': bputs(&out, "\f"); break;
        case 'u': {
            unsigned cp = 0;
            if (i + 4 < len) {
                char hex[5];
                memcpy(hex, s + i + 1, 4);
                hex[4] = 0;
                cp = (unsigned)strtoul(hex, NULL, 16);
                i += 4;
            }
            char u[4];
            if (cp < 0x80) {
                u[0] = (char)cp;
                bput(&out, u, 1);
            } else if (cp < 0x800) {
                u[0] = (char)(0xC0 | (cp >> 6));
                u[1] = (char)(0x80 | (cp & 0x3F));
                bput(&out, u, 2);
            } else {
                u[0] = (char)(0xE0 | (cp >> 12));
                u[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
                u[2] = (char)(0x80 | (cp & 0x3F));
                bput(&out, u, 3);
            }
            break;
        }
        default: bput(&out, &c, 1);
        }
    }
    if (!out.p) bputs(&out, "");
    return out.p;
}

/* ------------------------------------------------------------------ events */

static int event_fd = -1;
static struct timespec started;

static void emit(const char *source, const char *event) {
    if (event_fd < 0) return;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    long long ns = (long long)(now.tv_sec - started.tv_sec) * 1000000000LL +
                   (now.tv_nsec - started.tv_nsec);
    char text[512];
    int k = snprintf(text, sizeof text,
                     "{\n  \"timestamp\": {\n    \"secs\": %lld,\n    \"nanos\": %lld\n  },\n"
                     "  \"source\": \"%s\",\n  \"event\": \"%s\",\n  \"properties\": null\n}\n\n",
                     ns / 1000000000LL, ns % 1000000000LL, source, event);
    if (k > 0 && write(event_fd, text, (size_t)k) < 0) {
        close(event_fd); /* a fifo whose reader went away */
        event_fd = -1;
    }
}

/* ------------------------------------------------------------------ the VMM */

enum vmstate { S_CREATED, S_RUNNING, S_PAUSED };
static const char *STATE_NAMES[] = {"Created", "Running", "Paused"};

static json *cfg;           /* the VM's config; NULL: no VM created */
static int instance;        /* a VM object exists (vm.boot or vm.restore built one) */
static enum vmstate state;  /* of the VM object */
static long long boot_ram;  /* memory the VM object started with */
static int next_device;     /* upstream names devices _disk0, _net1, ... from one counter */
static int next_slot = 1;   /* PCI slot for the next hot-plugged device */
static int pending_power_off;
static int vmm_shutdown_emitted;
static const char *socket_path;

typedef struct {
    int status;
    buf body;      /* empty and !has_body: no body */
    int has_body;
    const char *raw; /* a verbatim body (micro_http's own errors) */
    int close;
    int exit_after; /* the process exits once the answer is out */
} reply;

/* status + ["Error from API", msg...] (NULL-terminated list) */
static void fail(reply *r, int status, ...) {
    va_list ap;
    r->status = status;
    r->has_body = 1;
    bputs(&r->body, "[\"Error from API\"");
    va_start(ap, status);
    const char *m;
    while ((m = va_arg(ap, const char *)) != NULL) {
        bputs(&r->body, ",");
        bquote(&r->body, m);
    }
    va_end(ap);
    bputs(&r->body, "]");
}

/* status + [msg...] without the "Error from API" head (HTTP layer / serde errors) */
static void fail_plain(reply *r, int status, const char *a, const char *b) {
    r->status = status;
    r->has_body = 1;
    bputs(&r->body, "[");
    bquote(&r->body, a);
    if (b) {
        bputs(&r->body, ",");
        bquote(&r->body, b);
    }
    bputs(&r->body, "]");
}

static void ok_json(reply *r, int status) {
    r->status = status;
    r->has_body = 1;
}

static void drop_vm(void) {
    if (!cfg) return;
    if (instance) emit("vm", "shutdown");
    jfree(cfg);
    cfg = NULL;
    instance = 0;
    state = S_CREATED;
    pending_power_off = 0;
    emit("vm", "deleted");
}

static void emit_vmm_shutdown(void) {
    if (!vmm_shutdown_emitted) {
        vmm_shutdown_emitted = 1;
        emit("vmm", "shutdown");
    }
}

static void start_instance(enum vmstate s) {
    instance = 1;
    state = s;
    boot_ram = jint(jget(jget(cfg, "memory"), "size"), 0);
    pending_power_off = 0;
}

static const char *transition_error(enum vmstate from, enum vmstate to, char *out, size_t n) {
    snprintf(out, n, "Invalid transition: InvalidStateTransition(%s, %s)", STATE_NAMES[from],
             STATE_NAMES[to]);
    return out;
}

/* Device lists of a VmConfig, their upstream id prefixes and add-* wording. */
typedef struct {
    const char *action, *key, *prefix, *what;
    int single;
} devkind;

static const devkind DEVICES[] = {
    {"vm.add-disk", "disks", "_disk", "disk", 0},
    {"vm.add-net", "net", "_net", "network device", 0},
    {"vm.add-fs", "fs", "_fs", "fs", 0},
    {"vm.add-pmem", "pmem", "_pmem", "pmem device", 0},
    {"vm.add-device", "devices", "_vfio", "device", 0},
    {"vm.add-user-device", "user_devices", "_user_device", "user device", 0},
    {"vm.add-vdpa", "vdpa", "_vdpa", "vdpa device", 0},
    {"vm.add-vsock", "vsock", "_vsock", "vsock device", 1},
};
#define NDEVICES (sizeof DEVICES / sizeof DEVICES[0])

static int id_in_use(const char *id) {
    for (size_t k = 0; k < NDEVICES; k++) {
        json *list = jget(cfg, DEVICES[k].key);
        if (!list) continue;
        if (list->t == J_OBJ) {
            char *s = jstr(jget(list, "id"));
            int same = s && !strcmp(s, id);
            free(s);
            if (same) return 1;
            continue;
        }
        for (size_t i = 0; list->t == J_ARR && i < list->n; i++) {
            char *s = jstr(jget(list->vals[i], "id"));
            int same = s && !strcmp(s, id);
            free(s);
            if (same) return 1;
        }
    }
    return 0;
}

/* Name the devices vm.create left unnamed, as vm.boot does upstream. */
static void assign_ids(void) {
    for (size_t k = 0; k < NDEVICES; k++) {
        json *list = jget(cfg, DEVICES[k].key);
        if (!list) continue;
        size_t count = list->t == J_ARR ? list->n : list->t == J_OBJ ? 1 : 0;
        for (size_t i = 0; i < count; i++) {
            json *dev = list->t == J_ARR ? list->vals[i] : list;
            if (dev->t == J_OBJ && !jget(dev, "id")) {
                char id[48];
                snprintf(id, sizeof id, "%s%d", DEVICES[k].prefix, next_device++);
                jset(dev, "id", jstrv(id));
            }
        }
    }
}

static int kernel_missing(void) {
    char *kernel = jstr(jget(jget(cfg, "payload"), "kernel"));
    int missing = kernel && access(kernel, F_OK) != 0;
    free(kernel);
    return missing;
}

/* The checks upstream's vm.boot makes before building the VM (a few of them). */
static int validate(reply *r, const char *what) {
    json *cpus = jget(cfg, "cpus");
    long long boot = jint(jget(cpus, "boot_vcpus"), 1), max = jint(jget(cpus, "max_vcpus"), 1);
    if (max < boot) {
        char msg[96];
        snprintf(msg, sizeof msg, "Max CPUs (%lld) lower than boot CPUs (%lld)", max, boot);
        fail(r, 400, what, "Failed to validate config", msg, NULL);
        return 0;
    }
    json *payload = jget(cfg, "payload");
    if (!jget(payload, "kernel") && !jget(payload, "firmware")) {
        fail(r, 400, what, "Failed to validate config", "Payload configuration is not bootable",
             NULL);
        return 0;
    }
    return 1;
}

static void do_ping(reply *r) {
    ok_json(r, 200);
    bprintf(&r->body,
            "{\"build_version\":\"" BUILD_VERSION "\",\"version\":\"" VERSION
            "\",\"pid\":%d,\"features\":[\"kvm\"]}",
            (int)getpid());
}

static void do_info(reply *r) {
    if (!cfg) {
        fail(r, 404, "The VM info is not available", "VM is not created", NULL);
        return;
    }
    ok_json(r, 200);
    bputs(&r->body, "{\"config\":");
    jdump(&r->body, cfg);
    json *mem = jget(cfg, "memory");
    long long size = jint(jget(mem, "size"), 0);
    if (instance) size += jint(jget(mem, "hotplugged_size"), 0);
    bprintf(&r->body, ",\"state\":\"%s\",\"memory_actual_size\":%lld",
            STATE_NAMES[instance ? state : S_CREATED], size);
    bputs(&r->body, instance ? ",\"device_tree\":{}}" : "}"); /* a VM object has devices */
}

static void do_counters(reply *r) {
    if (!instance) {
        fail(r, 500, "The VM info is not available", "VM is not running", NULL);
        return;
    }
    ok_json(r, 200);
    bputs(&r->body, "{}");
}

static void do_create(reply *r, json *body) {
    const char *what = "The VM could not be created";
    if (cfg) {
        fail(r, 500, what, "VM is already created", NULL);
        return;
    }
    if (!jget(body, "cpus")) jset(body, "cpus", jparse_str("{\"boot_vcpus\":1,\"max_vcpus\":1}"));
    if (!jget(body, "memory")) jset(body, "memory", jparse_str("{\"size\":536870912}"));
    cfg = body; /* kept as given: vm.info echoes it */
    instance = 0;
    state = S_CREATED;
    r->status = 204;
}

static void do_delete(reply *r) {
    drop_vm();
    r->status = 204;
}

static void do_boot(reply *r) {
    const char *what = "The VM could not boot";
    if (cfg && instance) {
        fail(r, 500, what, "VM is already created", NULL); /* before any event */
        return;
    }
    emit("vm", "booting");
    if (!cfg) {
        fail(r, 404, what, "VM config is missing", NULL);
        return;
    }
    if (!validate(r, what)) return;
    assign_ids();
    if (kernel_missing()) {
        /* upstream keeps the half-built VM object: Created, "already created" next time */
        instance = 1;
        state = S_CREATED;
        fail(r, 500, what, "Cannot open kernel file", "No such file or directory (os error 2)",
             NULL);
        return;
    }
    start_instance(S_RUNNING);
    emit("vm", "booted");
    r->status = 204;
}

static int guest_powered_off(void);

static void do_pause_resume(reply *r, int pause) {
    const char *what = pause ? "The VM could not be paused" : "The VM could not resume";
    if (!cfg || !instance) {
        fail(r, 500, what, "VM is not running", NULL);
        return;
    }
    emit("vm", pause ? "pausing" : "resuming");
    enum vmstate want = pause ? S_PAUSED : S_RUNNING;
    if (state != (pause ? S_RUNNING : S_PAUSED)) {
        char msg[96];
        fail(r, 500, what, pause ? "Cannot pause VM" : "Cannot resume VM",
             pause ? "Failed to pause migratable component" : "Failed to resume migratable component",
             transition_error(state, want, msg, sizeof msg), NULL);
        return;
    }
    state = want;
    emit("vm", pause ? "paused" : "resumed");
    r->status = 204;
    if (!pause && pending_power_off && guest_powered_off()) r->exit_after = 1;
}

static void do_shutdown(reply *r) {
    if (!cfg || !instance) {
        fail(r, 500, "The VM could not shutdown", "VM is not running", NULL);
        return;
    }
    instance = 0; /* the VM object goes, the config stays: vm.info says Created */
    state = S_CREATED;
    pending_power_off = 0;
    emit("vm", "shutdown");
    r->status = 204;
}

static void do_reboot(reply *r) {
    const char *what = "The VM could not reboot";
    emit("vm", "rebooting");
    if (!cfg || !instance) {
        fail(r, 404, what, "VM is not created", NULL);
        return;
    }
    if (kernel_missing()) {
        instance = 0;
        state = S_CREATED;
        fail(r, 500, what, "Cannot open kernel file", "No such file or directory (os error 2)",
             NULL);
        return;
    }
    start_instance(S_RUNNING);
    emit("vm", "rebooted");
    r->status = 204;
}

/* Upstream's guest-exit path: the whole VMM shuts down. Returns 1: exit now. */
static int guest_powered_off(void) {
    drop_vm();
    emit_vmm_shutdown();
    return 1;
}

static void do_power_button(reply *r) {
    if (!cfg || !instance) {
        fail(r, 500, "Error triggering power button", "VM is not running", NULL);
        return;
    }
    r->status = 204;
    if (state == S_RUNNING) {
        if (guest_powered_off()) r->exit_after = 1;
    } else if (state == S_PAUSED) {
        pending_power_off = 1; /* the guest reacts once it runs again */
    }
}

static void do_nmi(reply *r) {
    if (!cfg || !instance) {
        fail(r, 500, "Error triggering NMI", "VM is not running", NULL);
        return;
    }
    r->status = 204;
}

static void do_resize(reply *r, json *body) {
    const char *what = "The VM could not be resized";
    if (!cfg) {
        fail(r, 404, what, "VM is not created", NULL);
        return;
    }
    json *cpus = jget(cfg, "cpus"), *memory = jget(cfg, "memory");
    json *vcpus = jget(body, "desired_vcpus"), *ram = jget(body, "desired_ram");
    json *balloon = jget(body, "desired_balloon");
    if (instance) {
        emit("vm", "resizing");
        if (vcpus && jint(vcpus, 0) > jint(jget(cpus, "max_vcpus"), 1)) {
            fail(r, 500, what, "Error from CPU manager", "Requested vCPUs exceed maximum", NULL);
            return;
        }
        if (ram && jint(ram, 0) > boot_ram + jint(jget(memory, "hotplug_size"), 0)) {
            fail(r, 500, what, "Memory manager error", "Not enough space in the hotplug RAM region",
                 NULL);
            return;
        }
    }
    if (vcpus && cpus && cpus->t == J_OBJ) jset(cpus, "boot_vcpus", jnum(jint(vcpus, 1)));
    if (ram && memory && memory->t == J_OBJ) jset(memory, "size", jnum(jint(ram, 0)));
    json *bal = jget(cfg, "balloon");
    if (balloon && bal && bal->t == J_OBJ) jset(bal, "size", jnum(jint(balloon, 0)));
    if (instance) emit("vm", "resized");
    r->status = 204;
}

static void do_resize_other(reply *r, const char *what) {
    if (!cfg) {
        fail(r, 404, what, "VM is not created", NULL);
        return;
    }
    r->status = 204;
}

static void do_add(reply *r, const devkind *kind, json *body, int *kept) {
    char what[96];
    snprintf(what, sizeof what, "The %s could not be added to the VM", kind->what);
    if (!cfg) {
        fail(r, 404, what, "VM is not created", NULL);
        return;
    }
    json *existing = jget(cfg, kind->key);
    if (kind->single && existing && existing->t != J_NULL) {
        fail(r, 500, what, "Too many virtio-vsock devices", NULL);
        return;
    }
    char *id = jstr(jget(body, "id"));
    if (id && id_in_use(id)) {
        char msg[160];
        snprintf(msg, sizeof msg, "Identifier %s is not unique", id);
        free(id);
        fail(r, 409, what, "Failed to validate config", msg, NULL);
        return;
    }
    if (!id && instance) { /* cold-plugged devices are named at vm.boot */
        char gen[48];
        snprintf(gen, sizeof gen, "%s%d", kind->prefix, next_device++);
        jset(body, "id", jstrv(gen));
        id = jstr(jget(body, "id"));
    }
    if (kind->single) {
        jset(cfg, kind->key, body);
    } else {
        if (!existing || existing->t != J_ARR) {
            existing = jnew(J_ARR);
            jset(cfg, kind->key, existing);
        }
        jappend(existing, NULL, body);
    }
    *kept = 1;
    if (instance) {
        ok_json(r, 200);
        bputs(&r->body, "{\"id\":");
        bquote(&r->body, id ? id : "");
        bprintf(&r->body, ",\"bdf\":\"0000:00:%02x.0\"}", 2 + (next_slot++ % 30));
    } else {
        r->status = 204;
    }
    free(id);
}

static void do_remove(reply *r, json *body) {
    const char *what = "The device could not be removed from the VM";
    char *id = jstr(jget(body, "id"));
    if (!id) {
        fail_plain(r, 400, "Failed to deserialize JSON", "missing field `id` at line 1 column 2");
        return;
    }
    if (!cfg) {
        free(id);
        fail(r, 404, what, "VM is not created", NULL);
        return;
    }
    for (size_t k = 0; k < NDEVICES; k++) {
        json *list = jget(cfg, DEVICES[k].key);
        if (!list) continue;
        if (list->t == J_OBJ) {
            char *s = jstr(jget(list, "id"));
            int same = s && !strcmp(s, id);
            free(s);
            if (same) {
                size_t at = 0;
                while (cfg->vals[at] != list) at++;
                jremove_at(cfg, at);
                free(id);
                r->status = 204;
                return;
            }
            continue;
        }
        for (size_t i = 0; list->t == J_ARR && i < list->n; i++) {
            char *s = jstr(jget(list->vals[i], "id"));
            int same = s && !strcmp(s, id);
            free(s);
            if (same) {
                jremove_at(list, i);
                free(id);
                r->status = 204;
                return;
            }
        }
    }
    char msg[200];
    if (instance) {
        snprintf(msg, sizeof msg, "Failed to find device corresponding to the given identifier: %s",
                 id);
        fail(r, 404, what, "Error from device manager", msg, NULL);
    } else {
        snprintf(msg, sizeof msg, "No device with id \"%s\" to remove", id);
        fail(r, 404, what, msg, NULL);
    }
    free(id);
}

/* A file:///dir URL's directory (malloc'd), or NULL with *err set. */
static char *url_dir(json *body, const char *key, char *err, size_t n) {
    char *url = jstr(jget(body, key));
    if (!url || strncmp(url, "file:///", 8) != 0) {
        snprintf(err, n, "Invalid URL \"%s\": expected file:///<absolute path>", url ? url : "");
        free(url);
        return NULL;
    }
    char *dir = strdup(url + 7);
    free(url);
    struct stat st;
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
        snprintf(err, n, "Destination is not a directory: \"%s\"", dir);
        free(dir);
        return NULL;
    }
    return dir;
}

static int write_file(const char *dir, const char *name, const char *data, size_t n) {
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return -1;
    ssize_t w = write(fd, data, n);
    close(fd);
    return w == (ssize_t)n ? 0 : -1;
}

static char *read_file(const char *dir, const char *name, size_t *n) {
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    buf b = {0};
    char chunk[8192];
    size_t k;
    while ((k = fread(chunk, 1, sizeof chunk, f)) > 0) bput(&b, chunk, k);
    fclose(f);
    if (!b.p) bputs(&b, "");
    *n = b.n;
    return b.p;
}

static void do_snapshot(reply *r, json *body) {
    const char *what = "The VM could not be snapshotted";
    if (!cfg || !instance) {
        fail(r, 500, what, "VM is not running", NULL);
        return;
    }
    emit("vm", "snapshotting");
    if (state != S_PAUSED) {
        fail(r, 500, what, "Cannot snapshot VM", "Failed to snapshot migratable component",
             "Trying to snapshot while VM is running", NULL);
        return;
    }
    emit("vm", "snapshotted");
    char err[PATH_MAX + 64];
    char *dir = url_dir(body, "destination_url", err, sizeof err);
    if (!dir) {
        fail(r, 500, what, "Cannot send VM snapshot", "Failed to send migratable component snapshot",
             err, NULL);
        return;
    }
    buf config = {0}, st = {0};
    jdump(&config, cfg);
    bprintf(&st, "{\"format\":\"fastvmm/1\",\"state\":\"Paused\",\"boot_ram\":%lld,"
                 "\"next_device\":%d}", boot_ram, next_device);
    long long size = jint(jget(jget(cfg, "memory"), "size"), 0);
    uint64_t ranges[2] = {0, (uint64_t)size};
    int bad = write_file(dir, "config.json", config.p, config.n) ||
              write_file(dir, "state.json", st.p, st.n) ||
              write_file(dir, "memory-ranges", (const char *)ranges, sizeof ranges);
    bfree(&config);
    bfree(&st);
    free(dir);
    if (bad) {
        fail(r, 500, what, "Cannot send VM snapshot", "Failed to send migratable component snapshot",
             strerror(errno), NULL);
        return;
    }
    r->status = 204;
}

static void do_restore(reply *r, json *body) {
    const char *what = "The VM could not be restored";
    if (cfg) {
        fail(r, 500, what, "VM is already created", NULL);
        return;
    }
    char err[PATH_MAX + 64];
    char *dir = url_dir(body, "source_url", err, sizeof err);
    if (!dir) {
        fail(r, 500, what, "Cannot restore VM", "Failed to send migratable component snapshot", err,
             NULL);
        return;
    }
    size_t n = 0, sn = 0;
    char *text = read_file(dir, "config.json", &n);
    char *stext = read_file(dir, "state.json", &sn);
    free(dir);
    json *config = text ? jparse(text, n, err, sizeof err) : NULL;
    json *st = stext ? jparse(stext, sn, err, sizeof err) : NULL;
    free(text);
    free(stext);
    if (!config || config->t != J_OBJ || !st) {
        jfree(config);
        jfree(st);
        fail(r, 500, what, "Cannot restore VM", "config.json or state.json is missing or invalid",
             NULL);
        return;
    }
    emit("vm", "restoring");
    cfg = config;
    start_instance(S_PAUSED);
    boot_ram = jint(jget(st, "boot_ram"), boot_ram);
    next_device = (int)jint(jget(st, "next_device"), next_device);
    jfree(st);
    emit("vm", "restored");
    if (jtrue(jget(body, "resume"))) {
        emit("vm", "resuming");
        state = S_RUNNING;
        emit("vm", "resumed");
    }
    r->status = 204;
}

static void do_vmm_shutdown(reply *r) {
    drop_vm();
    emit_vmm_shutdown();
    ok_json(r, 200); /* upstream: 200 with an empty body, then the process exits */
    r->exit_after = 1;
}

/* --------------------------------------------------------------- routing */

enum body_need { B_NONE, B_OPTIONAL, B_REQUIRED };

typedef struct {
    const char *action;
    char method; /* 'G' or 'P' */
    enum body_need body;
} route;

static const route ROUTES[] = {
    {"vmm.ping", 'G', B_NONE},
    {"vm.info", 'G', B_NONE},
    {"vm.counters", 'G', B_NONE},
    {"vmm.shutdown", 'P', B_NONE},
    {"vm.create", 'P', B_REQUIRED},
    {"vm.delete", 'P', B_NONE},
    {"vm.boot", 'P', B_NONE},
    {"vm.pause", 'P', B_NONE},
    {"vm.resume", 'P', B_NONE},
    {"vm.shutdown", 'P', B_NONE},
    {"vm.reboot", 'P', B_NONE},
    {"vm.power-button", 'P', B_NONE},
    {"vm.nmi", 'P', B_NONE},
    {"vm.resize", 'P', B_REQUIRED},
    {"vm.resize-disk", 'P', B_REQUIRED},
    {"vm.resize-zone", 'P', B_REQUIRED},
    {"vm.remove-device", 'P', B_REQUIRED},
    {"vm.snapshot", 'P', B_REQUIRED},
    {"vm.restore", 'P', B_REQUIRED},
    {"vm.coredump", 'P', B_REQUIRED},
    {"vm.send-migration", 'P', B_REQUIRED},
    {"vm.receive-migration", 'P', B_REQUIRED},
    {"vm.add-disk", 'P', B_REQUIRED},
    {"vm.add-net", 'P', B_REQUIRED},
    {"vm.add-fs", 'P', B_REQUIRED},
    {"vm.add-pmem", 'P', B_REQUIRED},
    {"vm.add-device", 'P', B_REQUIRED},
    {"vm.add-user-device", 'P', B_REQUIRED},
    {"vm.add-vdpa", 'P', B_REQUIRED},
    {"vm.add-vsock", 'P', B_REQUIRED},
};

static const char UNSUPPORTED_METHOD[] =
    "{ \"error\": \"Invalid HTTP Method: Unsupported HTTP method.\n"
    "All previous unanswered requests will be dropped.\" }";

static void handle(reply *r, const char *method, const char *path, const char *raw, size_t len) {
    int get = !strcmp(method, "GET"), put = !strcmp(method, "PUT");
    if (!get && !put && strcmp(method, "PATCH") && strcmp(method, "DELETE")) {
        r->status = 400; /* micro_http parses GET, PUT, PATCH and DELETE only */
        r->raw = UNSUPPORTED_METHOD;
        r->close = 1;
        return;
    }
    const route *rt = NULL;
    if (!strncmp(path, API_PREFIX, strlen(API_PREFIX))) {
        const char *action = path + strlen(API_PREFIX);
        for (size_t k = 0; k < sizeof ROUTES / sizeof ROUTES[0]; k++)
            if (!strcmp(ROUTES[k].action, action)) rt = &ROUTES[k];
    }
    if (!rt) {
        fail_plain(r, 404, "Not Found", NULL);
        return;
    }
    if (!(rt->method == 'G' ? get : put)) {
        if (get || put || !strcmp(rt->action, "vm.create"))
            fail_plain(r, 400, "Bad Request", NULL);
        else
            r->status = 400; /* PATCH/DELETE: a bare 400 */
        return;
    }
    json *body = NULL;
    if (rt->body != B_NONE) {
        if (len == 0) {
            if (!strcmp(rt->action, "vm.create"))
                r->status = 400; /* upstream: a 400 without a body */
            else
                fail_plain(r, 400, "Bad Request", NULL);
            return;
        }
        char err[200];
        body = jparse(raw, len, err, sizeof err);
        if (!body) {
            fail_plain(r, 400, "Failed to deserialize JSON", err);
            return;
        }
        if (body->t != J_OBJ) {
            jfree(body);
            fail_plain(r, 400, "Failed to deserialize JSON", "invalid type: expected a JSON object");
            return;
        }
    }
    int kept = 0; /* the handler took ownership of body */
    const char *a = rt->action;
    if (!strcmp(a, "vmm.ping")) do_ping(r);
    else if (!strcmp(a, "vm.info")) do_info(r);
    else if (!strcmp(a, "vm.counters")) do_counters(r);
    else if (!strcmp(a, "vmm.shutdown")) do_vmm_shutdown(r);
    else if (!strcmp(a, "vm.create")) {
        do_create(r, body);
        kept = r->status == 204;
    } else if (!strcmp(a, "vm.delete")) do_delete(r);
    else if (!strcmp(a, "vm.boot")) do_boot(r);
    else if (!strcmp(a, "vm.pause")) do_pause_resume(r, 1);
    else if (!strcmp(a, "vm.resume")) do_pause_resume(r, 0);
    else if (!strcmp(a, "vm.shutdown")) do_shutdown(r);
    else if (!strcmp(a, "vm.reboot")) do_reboot(r);
    else if (!strcmp(a, "vm.power-button")) do_power_button(r);
    else if (!strcmp(a, "vm.nmi")) do_nmi(r);
    else if (!strcmp(a, "vm.resize")) do_resize(r, body);
    else if (!strcmp(a, "vm.resize-disk")) do_resize_other(r, "The disk could not be resized");
    else if (!strcmp(a, "vm.resize-zone")) do_resize_other(r, "The memory zone could not be resized");
    else if (!strcmp(a, "vm.remove-device")) do_remove(r, body);
    else if (!strcmp(a, "vm.snapshot")) do_snapshot(r, body);
    else if (!strcmp(a, "vm.restore")) do_restore(r, body);
    else if (!strncmp(a, "vm.add-", 7)) {
        for (size_t k = 0; k < NDEVICES; k++)
            if (!strcmp(DEVICES[k].action, a)) do_add(r, &DEVICES[k], body, &kept);
    } else {
        char msg[96];
        snprintf(msg, sizeof msg, "%s is not supported by fastvmm", a);
        fail(r, 500, msg, NULL);
    }
    if (!kept) jfree(body);
}

/* ------------------------------------------------------------------ HTTP */

typedef struct {
    int fd;
    buf in, out;
    int close_after;   /* close once out is flushed */
    int continued;     /* 100 Continue sent for the request being read */
} conn;

static conn *conns;
static size_t nconns, capconns;

static void format_reply(buf *out, const reply *r) {
    const char *payload = r->raw ? r->raw : r->body.p ? r->body.p : "";
    size_t len = r->raw ? strlen(r->raw) : r->body.n;
    /* micro_http sends no reason phrase */
    bprintf(out, "HTTP/1.1 %d \r\nServer: Cloud Hypervisor API\r\nConnection: %s\r\n", r->status,
            r->close ? "close" : "keep-alive");
    if (r->status != 204) {
        if (r->has_body || r->raw) bputs(out, "Content-Type: application/json\r\n");
        bprintf(out, "Content-Length: %zu\r\n", len);
    }
    bputs(out, "\r\n");
    bput(out, payload, len);
}

static int flush_out(conn *c) {
    while (c->out.n) {
        ssize_t w = send(c->fd, c->out.p, c->out.n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
            return -1;
        }
        bconsume(&c->out, (size_t)w);
    }
    return 0;
}

static void finish(int code) {
    if (socket_path) unlink(socket_path);
    emit_vmm_shutdown();
    if (event_fd >= 0) close(event_fd);
    exit(code);
}

/* Send what is queued, blocking: used right before the process exits. */
static void flush_blocking(conn *c) {
    int flags = fcntl(c->fd, F_GETFL);
    fcntl(c->fd, F_SETFL, flags & ~O_NONBLOCK);
    flush_out(c);
    shutdown(c->fd, SHUT_WR);
}

static size_t header_value(const char *hdrs, size_t n, const char *name, char *out, size_t outlen) {
    size_t nl = strlen(name);
    const char *p = hdrs, *end = hdrs + n;
    while (p < end) {
        const char *eol = memmem(p, (size_t)(end - p), "\r\n", 2);
        if (!eol) eol = end;
        if ((size_t)(eol - p) > nl && !strncasecmp(p, name, nl) && p[nl] == ':') {
            const char *v = p + nl + 1;
            while (v < eol && (*v == ' ' || *v == '\t')) v++;
            const char *ve = eol;
            while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) ve--;
            size_t len = (size_t)(ve - v) < outlen - 1 ? (size_t)(ve - v) : outlen - 1;
            memcpy(out, v, len);
            out[len] = 0;
            return 1;
        }
        p = eol + 2;
    }
    return 0;
}

/* Answer every complete request in c->in. Returns -1 to drop the connection now. */
static int serve(conn *c) {
    while (!c->close_after) {
        char *end = c->in.n ? memmem(c->in.p, c->in.n, "\r\n\r\n", 4) : NULL;
        if (!end) {
            if (c->in.n > MAX_HEADER) return -1;
            return 0;
        }
        size_t head = (size_t)(end - c->in.p) + 4;
        char *line_end = memmem(c->in.p, head, "\r\n", 2);
        char method[16] = "", target[1024] = "", version[16] = "";
        {
            char line[1200];
            size_t ll = (size_t)(line_end - c->in.p);
            if (ll >= sizeof line) ll = sizeof line - 1;
            memcpy(line, c->in.p, ll);
            line[ll] = 0;
            if (sscanf(line, "%15s %1023s %15s", method, target, version) != 3) return -1;
        }
        char *q = strchr(target, '?');
        if (q) *q = 0;
        const char *hdrs = line_end + 2;
        size_t hlen = head - (size_t)(hdrs - c->in.p);
        char val[128];
        size_t length = 0;
        reply r = {0};
        int keep = strcmp(version, "HTTP/1.0") != 0;
        if (header_value(hdrs, hlen, "Connection", val, sizeof val))
            keep = strcasecmp(val, "close") ? (strcasecmp(val, "keep-alive") ? keep : 1) : 0;
        if (header_value(hdrs, hlen, "Transfer-Encoding", val, sizeof val) &&
            strcasecmp(val, "identity")) {
            fail(&r, 400, "Bad Request", "Transfer-Encoding is not supported", NULL);
            r.close = 1;
        } else if (header_value(hdrs, hlen, "Content-Length", val, sizeof val)) {
            char *e;
            unsigned long long v = strtoull(val, &e, 10);
            if (*e || val[0] == '-' || v > MAX_BODY) {
                fail(&r, 400, "Invalid request body", "Content-Length missing, invalid or too large",
                     NULL);
                r.close = 1;
            } else {
                length = (size_t)v;
            }
        }
        if (!r.status && c->in.n < head + length) {
            if (!c->continued && header_value(hdrs, hlen, "Expect", val, sizeof val) &&
                !strcasecmp(val, "100-continue")) {
                bputs(&c->out, "HTTP/1.1 100 Continue\r\n\r\n");
                c->continued = 1;
            }
            return 0; /* the body is still on its way */
        }
        if (!r.status) handle(&r, method, target, c->in.p + head, length);
        if (!keep) r.close = 1;
        format_reply(&c->out, &r);
        bfree(&r.body);
        c->continued = 0;
        if (r.close || r.exit_after) {
            c->close_after = 1;
            c->in.n = 0;
        } else {
            bconsume(&c->in, head + length);
        }
        if (r.exit_after) {
            flush_blocking(c);
            finish(0);
        }
    }
    return 0;
}

static void drop_conn(size_t i) {
    close(conns[i].fd);
    bfree(&conns[i].in);
    bfree(&conns[i].out);
    conns[i] = conns[--nconns];
}

/* Bind under a temporary name and rename, so the path exists only once it listens. */
static int bind_socket(const char *path) {
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    char temp[PATH_MAX];
    const char *slash = strrchr(path, '/');
    int dirlen = slash ? (int)(slash - path + 1) : 0;
    snprintf(temp, sizeof temp, "%.*s.%s.%d", dirlen, path, slash ? slash + 1 : path, (int)getpid());
    const char *target = strlen(temp) < sizeof addr.sun_path ? temp : path;
    if (strlen(target) >= sizeof addr.sun_path) {
        errno = ENAMETOOLONG;
        close(fd);
        return -1;
    }
    unlink(path);
    unlink(target);
    strcpy(addr.sun_path, target);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 128) < 0) {
        close(fd);
        return -1;
    }
    if (target != path && rename(target, path) < 0) {
        unlink(target);
        close(fd);
        return -1;
    }
    return fd;
}

static const char *option(const char *value, const char *key) {
    /* "path=/x,foo=bar" -> "/x" for key "path"; a bare value is the path */
    if (!strchr(value, '=')) return !strcmp(key, "path") ? value : NULL;
    size_t kl = strlen(key);
    const char *p = value;
    while (p && *p) {
        if (!strncmp(p, key, kl) && p[kl] == '=') {
            const char *v = p + kl + 1, *e = strchr(v, ',');
            return e ? strndup(v, (size_t)(e - v)) : v;
        }
        p = strchr(p, ',');
        if (p) p++;
    }
    return NULL;
}

int main(int argc, char **argv) {
    const char *events = NULL;
    clock_gettime(CLOCK_MONOTONIC, &started);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--version") || !strcmp(argv[i], "-V")) {
            printf("cloud-hypervisor " BUILD_VERSION "\n");
            return 0;
        }
        if (!strcmp(argv[i], "--api-socket") && i + 1 < argc) socket_path = option(argv[++i], "path");
        else if (!strncmp(argv[i], "--api-socket=", 13)) socket_path = option(argv[i] + 13, "path");
        else if (!strcmp(argv[i], "--event-monitor") && i + 1 < argc) events = argv[++i];
        else if (!strncmp(argv[i], "--event-monitor=", 16)) events = argv[i] + 16;
        /* anything else (--seccomp, -v, --log-file, ...) is ignored */
    }
    if (!socket_path) {
        fprintf(stderr, "Error: --api-socket path=<socket> is required\n");
        return 1;
    }
    if (events) {
        const char *fdv = option(events, "fd"), *path = option(events, "path");
        if (fdv) event_fd = atoi(fdv);
        else if (path) event_fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
        if (event_fd < 0) {
            fprintf(stderr, "Error: cannot open the event monitor %s: %s\n", events, strerror(errno));
            return 1;
        }
    }
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGUSR1);
    sigaddset(&mask, SIGUSR2);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    int sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    signal(SIGPIPE, SIG_IGN);
    emit("vmm", "starting");
    int lfd = bind_socket(socket_path);
    if (lfd < 0) {
        fprintf(stderr, "Error: cannot bind the API socket %s: %s\n", socket_path, strerror(errno));
        finish(1);
    }
    struct pollfd *fds = NULL;
    size_t capfds = 0;
    for (;;) {
        if (capfds < nconns + 2) {
            capfds = (nconns + 2) * 2;
            fds = realloc(fds, capfds * sizeof *fds);
            if (!fds) abort();
        }
        fds[0] = (struct pollfd){.fd = lfd, .events = POLLIN};
        fds[1] = (struct pollfd){.fd = sfd, .events = POLLIN};
        for (size_t i = 0; i < nconns; i++)
            fds[i + 2] = (struct pollfd){.fd = conns[i].fd,
                                         .events = (short)(POLLIN | (conns[i].out.n ? POLLOUT : 0))};
        int ready = poll(fds, nconns + 2, -1);
        if (ready < 0) {
            if (errno == EINTR) continue;
            perror("poll");
            finish(1);
        }
        if (fds[1].revents & POLLIN) {
            struct signalfd_siginfo si;
            while (read(sfd, &si, sizeof si) == sizeof si) {
                if (si.ssi_signo == SIGUSR1) {
                    if (cfg && instance && state != S_CREATED) { /* the guest powers off */
                        guest_powered_off();
                        finish(0);
                    }
                } else if (si.ssi_signo == SIGUSR2) {
                    if (cfg && instance && state == S_RUNNING) {
                        emit("vm", "rebooting");
                        start_instance(S_RUNNING);
                        emit("vm", "rebooted");
                    }
                } else {
                    finish(0);
                }
            }
        }
        /* Walk the connections polled this round, from the end: drop_conn moves the last
         * one into the freed slot, and those were all looked at already. */
        for (size_t i = nconns; i-- > 0;) {
            short ev = fds[i + 2].revents;
            if (!ev) continue;
            conn *c = &conns[i];
            int bad = 0;
            if (ev & (POLLIN | POLLHUP | POLLERR)) {
                char chunk[65536];
                ssize_t got = recv(c->fd, chunk, sizeof chunk, 0);
                if (got > 0) {
                    if (!c->close_after) bput(&c->in, chunk, (size_t)got);
                    if (serve(c) < 0) bad = 1;
                } else if (got == 0 || (errno != EAGAIN && errno != EINTR)) {
                    bad = 1;
                }
            }
            if (!bad && flush_out(c) < 0) bad = 1;
            if (bad || (c->close_after && !c->out.n)) drop_conn(i);
        }
        if (fds[0].revents & POLLIN) {
            for (;;) {
                int cfd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                if (cfd < 0) break;
                if (nconns == capconns) {
                    capconns = capconns ? capconns * 2 : 16;
                    conns = realloc(conns, capconns * sizeof *conns);
                    if (!conns) abort();
                }
                conns[nconns++] = (conn){.fd = cfd};
            }
        }
    }
}
