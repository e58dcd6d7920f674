// smartvm's native guest agent: serves the protocol of docs/agent-protocol.md on the QEMU
// engine's virtio-serial ports, with the hot ops (ping, health, exec, reseed, set_time, sync)
// compiled, which under TCG answer several times faster than the Python agent; every other op is
// relayed to the Python agent (proxy.go). Where there is no virtio-serial port (Firecracker's
// vsock), it hands over to the Python agent entirely (exec). Started by guest_files/run-agent.
package main

import (
	"fmt"
	"log"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

const (
	defaultPython = "/usr/bin/python3"
	defaultAgent  = "/opt/smartvm/agent.py"
	afVsock       = 40
)

func logf(format string, args ...any) { log.Printf(format, args...) }

func usage() int {
	fmt.Fprintln(os.Stderr, "usage: agent-native [--stdio | --listen-unix PATH | --virtio-port NAME] "+
		"[--dry-run-system] [--python PATH] [--python-agent FILE] [--version]")
	return 2
}

// noInheritedFds marks inherited fds beyond 0-2 close-on-exec, as every fd the agent opens is.
func noInheritedFds() {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return
	}
	for _, e := range entries {
		if fd, err := strconv.Atoi(e.Name()); err == nil && fd > 2 {
			syscall.Syscall(syscall.SYS_FCNTL, uintptr(fd), syscall.F_SETFD, syscall.FD_CLOEXEC)
		}
	}
}

func run(args []string) int {
	log.SetFlags(0)
	log.SetPrefix(fmt.Sprintf("smartvm-agent-native[%d]: ", os.Getpid()))
	dry := os.Getenv("SMARTVM_AGENT_DRY_RUN") == "1"
	mode, value := "auto", ""
	python, agentFile := defaultPython, defaultAgent
	for len(args) > 0 {
		arg := args[0]
		args = args[1:]
		switch {
		case arg == "--version":
			fmt.Printf("smartvm-agent %s protocol %d native\n", agentVersion, protocolVersion)
			return 0
		case arg == "--dry-run-system":
			dry = true
		case arg == "--stdio":
			mode = "stdio"
		case (arg == "--listen-unix" || arg == "--virtio-port" || arg == "--python" || arg == "--python-agent") && len(args) > 0:
			switch arg {
			case "--python":
				python = args[0]
			case "--python-agent":
				agentFile = args[0]
			default:
				mode, value = arg[2:], args[0]
			}
			args = args[1:]
		default:
			return usage()
		}
	}
	noInheritedFds()
	var childArgs []string
	if dry {
		childArgs = append(childArgs, "--dry-run-system")
	}
	if mode != "stdio" && mode != "listen-unix" {
		childArgs = append(childArgs, "--work-in-home")
		if dir, err := os.Getwd(); err == nil { // where relative request paths point, as in guest.py
			startDir = dir
		}
	}
	if mode != "stdio" && mode != "listen-unix" {
		startProfileFromCmdline()
	}
	proxy := newProxy(python, agentFile, childArgs)
	agent := newAgent(dry, proxy)
	switch mode {
	case "stdio":
		go proxy.start()
		agent.serveStdio()
		return 0
	case "listen-unix":
		go proxy.start()
		if err := agent.serveUnix(value); err != nil {
			log.Print(err)
			return 1
		}
		return 0
	}
	name := virtioPortName
	if mode == "virtio-port" {
		name = value
	}
	served := map[string]bool{}
	expected := announcedPorts()
	var foundAt time.Time
	for {
		for port, dev := range findVirtioPorts(name) {
			if !served[port] {
				served[port] = true
				if len(served) == 1 {
					go proxy.start()
				}
				go agent.serveVirtio(dev)
			}
		}
		if expected > 0 && len(served) >= expected {
			select {} // every port the host made is served: nothing to look for any more
		}
		if len(served) > 0 {
			// the ports appear together at driver probe; a late one is still picked up for a while
			if foundAt.IsZero() {
				foundAt = time.Now()
			}
			if time.Since(foundAt) < 10*time.Second {
				time.Sleep(time.Second)
			} else {
				time.Sleep(60 * time.Second)
			}
			continue
		}
		if mode == "auto" && vsockAvailable() {
			return handOver(python, agentFile, dry)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// announcedPorts is the number of agent ports the host made (smartvm.agent_ports=N on the kernel
// command line; 0: not said). Once all are served the agent stops looking for more: a rescan every
// second for the first 10 s after boot would otherwise run again in every guest restored from a
// snapshot taken in those seconds (templates are), each time re-translated under TCG.
func announcedPorts() int {
	data, err := os.ReadFile("/proc/cmdline")
	if err != nil {
		return 0
	}
	return portsIn(string(data))
}

// portsIn reads smartvm.agent_ports=N from a kernel command line (0: absent or not a count).
func portsIn(cmdline string) int {
	n := 0
	for _, word := range strings.Fields(cmdline) {
		if strings.HasPrefix(word, "smartvm.agent_ports=") {
			if v, err := strconv.Atoi(word[len("smartvm.agent_ports="):]); err == nil && v > 0 {
				n = v
			}
		}
	}
	return n
}

// vsockAvailable: the kernel has AF_VSOCK (Firecracker), served by the Python agent.
func vsockAvailable() bool {
	fd, err := syscall.Socket(afVsock, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return false
	}
	syscall.Close(fd)
	return true
}

// handOver replaces this process with the Python agent (it serves vsock itself).
func handOver(python, agentFile string, dry bool) int {
	code := fmt.Sprintf("import sys; sys.path[0] = %q; import agent; sys.exit(agent.main())", "/opt/smartvm")
	argv := []string{python, "-c", code}
	if agentFile != defaultAgent {
		argv = []string{python, agentFile}
	}
	if dry {
		argv = append(argv, "--dry-run-system")
	}
	err := syscall.Exec(python, argv, os.Environ())
	log.Printf("cannot start the Python agent for vsock: %v", err)
	return 1
}

func main() { os.Exit(run(os.Args[1:])) }
