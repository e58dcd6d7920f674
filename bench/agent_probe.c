/*
 * A compiled stand-in for the guest agent's hot paths, for bench/agent_alternatives.py only: it
 * measures what a compiled agent would cost under TCG next to smartvm's Python agent. Not an agent:
 * no framing beyond what the benchmark needs, no users, env, cwd, timeouts or multiplexing.
 *
 * Usage: agent_probe /dev/vportNpM. Requests are one byte each:
 *   'p'  ping                   -> "P"
 *   'x'  run /bin/true          -> "X" + exit status byte (stdout and stderr piped, read to their
 *                                   end and the child reaped, as the agent's exec does)
 *   'c'  run cat /tmp/probe-1m  -> frames of (u32 length, bytes) of its stdout, a u32 0, then "C" +
 *                                   exit status byte
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;
static int port;
static char buf[1 << 18];

/* The virtio console takes at most 32 KiB per write. */
static void write_all(const void *data, size_t n) {
    const char *p = data;
    while (n > 0) {
        ssize_t w = write(port, p, n > 32768 ? 32768 : n);
        if (w <= 0) _exit(3);
        p += w;
        n -= (size_t)w;
    }
}

static int run(char *const argv[], int forward) {
    int out[2], err[2];
    if (pipe2(out, O_CLOEXEC) || pipe2(err, O_CLOEXEC)) return 255;
    fcntl(out[1], F_SETPIPE_SZ, 1 << 20);
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_adddup2(&fa, out[1], 1);
    posix_spawn_file_actions_adddup2(&fa, err[1], 2);
    pid_t pid;
    int failed = posix_spawn(&pid, argv[0], &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    close(out[1]);
    close(err[1]);
    struct pollfd fds[2] = {{out[0], POLLIN, 0}, {err[0], POLLIN, 0}};
    for (int open_ends = failed ? 0 : 2; open_ends > 0;) {
        poll(fds, 2, -1);
        for (int i = 0; i < 2; i++) {
            if (!fds[i].revents) continue;
            ssize_t r = read(fds[i].fd, buf, sizeof buf);
            if (r <= 0) {
                fds[i].fd = -1;
                open_ends--;
            } else if (forward) {
                uint32_t len = (uint32_t)r;
                write_all(&len, 4);
                write_all(buf, (size_t)r);
            }
        }
    }
    close(out[0]);
    close(err[0]);
    int status = 0;
    if (failed || waitpid(pid, &status, 0) < 0) return 255;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

int main(int argc, char **argv) {
    if (argc != 2 || (port = open(argv[1], O_RDWR)) < 0) {
        perror("agent_probe: open the port");
        return 1;
    }
    char *const true_argv[] = {"/bin/true", NULL};
    char *const cat_argv[] = {"/bin/cat", "/tmp/probe-1m", NULL};
    for (;;) {
        char op;
        ssize_t got = read(port, &op, 1);
        if (got == 0) { /* no host connected (e.g. after a restore): look again soon */
            usleep(500);
            continue;
        }
        if (got < 0) return 2;
        if (op == 'p') {
            write_all("P", 1);
        } else if (op == 'x') {
            char answer[2] = {'X', (char)run(true_argv, 0)};
            write_all(answer, 2);
        } else if (op == 'c') {
            int status = run(cat_argv, 1);
            uint32_t end = 0;
            write_all(&end, 4);
            char answer[2] = {'C', (char)status};
            write_all(answer, 2);
        }
    }
}
