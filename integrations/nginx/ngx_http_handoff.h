/*
 * XO handoff module for nginx: shared declarations of its three parts.
 *   ngx_http_handoff_module.c  directives, variables, handoff_out / handoff_in / give back
 *   ngx_http_handoff_agent.c   the worker's non-blocking unix-socket link to the local xo agent
 *   ngx_http_handoff_conn.c    adopting a received client fd as an nginx HTTP connection
 */
#ifndef NGX_HTTP_HANDOFF_H
#define NGX_HTTP_HANDOFF_H

#include <ngx_config.h>
#include <ngx_core.h>
#include <ngx_event.h>
#include <ngx_http.h>

#include "xo_local_codec.h"

/* A frame: 4-byte big-endian length, then the serialized LocalMessage (local.proto). */
#define XO_FRAME_HEADER 4
/* Larger frames are a protocol error (a handed-in request is a few KiB). */
#define XO_FRAME_MAX (16 * 1024 * 1024)

typedef struct {
    ngx_str_t                 agent_path;   /* handoff_agent unix:PATH */
    ngx_str_t                 app;          /* handoff_app NAME */
    ngx_msec_t                retry;        /* handoff_agent_retry */
    ngx_msec_t                giveback_timeout;
    ngx_flag_t                in_used;      /* some server has handoff_in on */
} ngx_http_handoff_main_conf_t;

/* The worker's link to the agent. */
typedef enum {
    XO_LINK_DOWN = 0,
    XO_LINK_HELLO,      /* connected, Hello sent, HelloReply awaited */
    XO_LINK_READY
} xo_link_state_e;

/* Called for every frame the agent sends; fd is the passed socket or -1 (the callee owns it). */
typedef void (*xo_link_message_pt)(xo_local_msg_t *msg, ngx_socket_t fd);
/* Called when the link goes down (fail every operation that waits for an answer). */
typedef void (*xo_link_down_pt)(void);
/* Operations still waiting for an answer; an exiting worker keeps its link until none. */
typedef ngx_uint_t (*xo_link_busy_pt)(void);

ngx_int_t xo_link_start(ngx_cycle_t *cycle, ngx_http_handoff_main_conf_t *hmcf,
    xo_link_message_pt on_message, xo_link_down_pt on_down, xo_link_busy_pt busy);
void xo_link_stop(void);
xo_link_state_e xo_link_state(void);
/* Queues msg (with fd passed by SCM_RIGHTS unless -1); the caller keeps fd open until the
 * answer, as local.proto requires. NGX_ERROR: not sent, the link is down. */
ngx_int_t xo_link_send(xo_local_msg_t *msg, ngx_socket_t fd);

/* How a connection came from the agent. */
typedef enum {
    XO_CONN_IN = 1,        /* handed in: serve, then give it back */
    XO_CONN_RETURNED       /* our own connection, returned by the target */
} xo_conn_kind_e;

/* Per adopted connection, in c->pool, found with ngx_http_handoff_conn_ctx(). */
typedef struct {
    ngx_connection_t         *c;
    xo_conn_kind_e            kind;
    ngx_str_t                 handoff_id;
    ngx_str_t                 preread;      /* served by c->recv before the socket's data */
    size_t                    preread_pos;
    ngx_uint_t                ktls;         /* the kernel does TLS on this socket */
    ngx_event_t               giveback_ev;  /* posted after a handed-in request is logged */
    void                     *giveback;     /* a pending give-back (module-owned) */
} ngx_http_handoff_conn_ctx_t;

/* Adopts a client socket received from the agent as a new nginx HTTP connection on listener
 * ls (like ngx_event_accept + the listener's handler); preread bytes are served before the
 * socket's own data. Closes fd on failure. */
ngx_connection_t *ngx_http_handoff_adopt(ngx_socket_t fd, ngx_listening_t *ls,
    xo_conn_kind_e kind, ngx_str_t *handoff_id, ngx_str_t *preread, ngx_log_t *log);
ngx_http_handoff_conn_ctx_t *ngx_http_handoff_conn_ctx(ngx_connection_t *c);
/* Runs when an adopted connection is destroyed (defined by the module). */
void ngx_http_handoff_conn_cleanup(void *data);
/* The HTTP listener whose address (or wildcard on the same port) matches fd's local address. */
ngx_listening_t *ngx_http_handoff_listener_for(ngx_socket_t fd);
/* Stops epoll from reporting c's socket, which outlives c->fd in another process. */
void ngx_http_handoff_detach(ngx_connection_t *c);

#endif
