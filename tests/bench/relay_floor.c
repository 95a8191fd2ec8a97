/* The least a relay can do, for the monitor guard's benchmark only (never
 * installed): accept one client on argv[1], connect to argv[2], and copy bytes
 * both ways with poll, read and write.  Its cost over QEMU's socket directly is
 * the floor for any process put between libvirt and QEMU on this machine. */
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static int unix_socket(const char *path, struct sockaddr_un *addr) {
    memset(addr, 0, sizeof *addr);
    addr->sun_family = AF_UNIX;
    strncpy(addr->sun_path, path, sizeof addr->sun_path - 1);
    return socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
}

int main(int argc, char **argv) {
    struct sockaddr_un here, there;
    if (argc != 3)
        return 2;
    int listener = unix_socket(argv[1], &here);
    int qemu = unix_socket(argv[2], &there);
    if (listener < 0 || qemu < 0 || bind(listener, (void *)&here, sizeof here) ||
        listen(listener, 1) || connect(qemu, (void *)&there, sizeof there))
        return 1;
    int client = accept(listener, NULL, NULL);
    if (client < 0)
        return 1;
    struct pollfd fds[2] = {{.fd = client, .events = POLLIN}, {.fd = qemu, .events = POLLIN}};
    static char buf[1 << 16];
    for (;;) {
        if (poll(fds, 2, -1) < 0)
            return 1;
        for (int i = 0; i < 2; i++) {
            if (!fds[i].revents)
                continue;
            ssize_t n = read(fds[i].fd, buf, sizeof buf);
            if (n <= 0)
                return 0;
            for (ssize_t done = 0; done < n;) {
                ssize_t w = write(fds[1 - i].fd, buf + done, n - done);
                if (w < 0)
                    return 1;
                done += w;
            }
        }
    }
}
