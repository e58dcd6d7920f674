// A development aid: `smartvm.agent_profile=PATH` on the guest kernel command line makes the agent
// write a Go CPU profile to PATH, finished at SIGUSR1 (read it back with the files API, then
// `go tool pprof -top agent-native PATH` on the host). How the costs under TCG were found.
package main

import (
	"os"
	"os/signal"
	"runtime/pprof"
	"strings"
	"syscall"
)

func startProfileFromCmdline() {
	data, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return
	}
	for _, arg := range strings.Fields(string(data)) {
		path := strings.TrimPrefix(arg, "smartvm.agent_profile=")
		if path == arg || path == "" {
			continue
		}
		f, err := os.Create(path)
		if err != nil {
			logf("profile: %v", err)
			return
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			logf("profile: %v", err)
			f.Close()
			return
		}
		stop := make(chan os.Signal, 1)
		signal.Notify(stop, syscall.SIGUSR1)
		go func() {
			<-stop
			pprof.StopCPUProfile()
			f.Close()
			logf("profile written to %s", path)
		}()
		return
	}
}
