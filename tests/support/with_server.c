/*
 * with_server KIND PROGRAM [ARGS...]: start a test store of KIND through the
 * harness, run PROGRAM ARGS... --url URL, stop the store, and exit with the
 * program's status. It lets an example run against a real server in the
 * test suite without a server on a fixed port.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "harness.h"

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: with_server KIND PROGRAM [ARGS...]\n");
        return 2;
    }
    idem_test_server srv;
    if (idem_test_server_start(&srv, argv[1]) != 0) {
        idem_test_server_stop(&srv);
        return 2;
    }
    char **args = calloc((size_t)argc + 1, sizeof *args);
    if (!args)
        return 2;
    for (int i = 2; i < argc; i++)
        args[i - 2] = argv[i];
    args[argc - 2] = "--url";
    args[argc - 1] = srv.url;
    int status = 2;
    pid_t pid = fork();
    if (pid == 0) {
        execv(args[0], args);
        perror(args[0]);
        _exit(127);
    }
    if (pid > 0 && waitpid(pid, &status, 0) == pid)
        status = WIFEXITED(status) ? WEXITSTATUS(status) : 2;
    else
        status = 2;
    free(args);
    idem_test_server_stop(&srv);
    return status;
}
