// The Agent (handlers, HELLO) and the small native ops: ping, health, sync, set_time and reseed
// (the last two are what the host sends right after a snapshot restore, so they must be fast).
// Same fields, checks and messages as guest.py's op_ping/op_health/op_sync/op_set_time/op_reseed.
package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"unsafe"
)

const (
	rndAddEntropy  = 0x40085203 // _IOW('R', 0x03, int[2])
	rndReseedCRNG  = 0x5207     // _IO('R', 0x07)
	reseedMaxBytes = 512
)

// Agent holds what all connections share.
type Agent struct {
	dryRun   bool
	started  float64
	handlers map[string]handler
	opNames  []string // sorted, made once: a HELLO after every restore would sort them again
	proxy    *Proxy
	procs    procTable
}

func newAgent(dryRun bool, proxy *Proxy) *Agent {
	a := &Agent{dryRun: dryRun, started: now(), proxy: proxy}
	a.handlers = map[string]handler{
		"ping":        a.opPing,
		"health":      a.opHealth,
		"sync":        a.opSync,
		"set_time":    a.opSetTime,
		"reseed":      a.opReseed,
		"exec":        a.opExec,
		"file_read":   a.opFileRead,
		"file_write":  a.opFileWrite,
		"proc_start":  a.opProcStart,
		"proc_run":    a.opProcRun,
		"proc_list":   a.opProcList,
		"proc_stdin":  a.opProcStdin,
		"proc_signal": a.opProcSignal,
		"proc_attach": a.opProcAttach,
	}
	for op := range a.handlers {
		a.opNames = append(a.opNames, op)
	}
	for op := range proxiedOps {
		a.opNames = append(a.opNames, op)
	}
	sort.Strings(a.opNames)
	if !dryRun {
		_, _ = urandom() // now, before any snapshot of this guest (see urandom)
	}
	return a
}

func (a *Agent) hello(c *Conn) map[string]any {
	info := map[string]any{
		"protocol":      protocolVersion,
		"agent_version": agentVersion,
		"pid":           os.Getpid(),
		"started":       a.started,
		"boot_time":     bootTime(),
		"transport":     c.t.Name(),
		"max_payload":   maxPayload,
		"max_header":    maxHeaderJSON,
		"ops":           a.ops(),
		"impl":          "native",
	}
	var u syscall.Utsname
	if syscall.Uname(&u) == nil {
		info["kernel"] = cstr(u.Release[:])
		info["hostname"] = cstr(u.Nodename[:])
		info["machine"] = cstr(u.Machine[:])
	}
	return info
}

func cstr(b []int8) string {
	out := make([]byte, 0, len(b))
	for _, c := range b {
		if c == 0 {
			break
		}
		out = append(out, byte(c))
	}
	return string(out)
}

// bootTime is /proc/stat's btime, the wall-clock time of boot in whole seconds, from two clocks:
// reading /proc/stat has the kernel format every interrupt counter, which a HELLO after each
// restore (when the guest re-translates every path it runs) paid for.
func bootTime() any {
	var real, boot syscall.Timespec
	if _, _, e := syscall.RawSyscall(syscall.SYS_CLOCK_GETTIME, clockRealtime, uintptr(unsafe.Pointer(&real)), 0); e != 0 {
		return nil
	}
	if _, _, e := syscall.RawSyscall(syscall.SYS_CLOCK_GETTIME, clockBoottime, uintptr(unsafe.Pointer(&boot)), 0); e != 0 {
		return nil
	}
	return float64((real.Nano() - boot.Nano()) / 1e9)
}

const (
	clockRealtime = 0
	clockBoottime = 7
)

func (a *Agent) opPing(ch *Channel, req map[string]any, payload []byte) error {
	ch.result(map[string]any{"time": now()})
	return nil
}

var memKeys = map[string]bool{"MemTotal": true, "MemFree": true, "MemAvailable": true, "Buffers": true,
	"Cached": true, "SwapTotal": true, "SwapFree": true}

func (a *Agent) opHealth(ch *Channel, req map[string]any, payload []byte) error {
	mem := map[string]int64{}
	if data, err := os.ReadFile("/proc/meminfo"); err == nil {
		for _, line := range strings.Split(string(data), "\n") {
			key, rest, ok := strings.Cut(line, ":")
			if !ok || !memKeys[key] {
				continue
			}
			if fields := strings.Fields(rest); len(fields) > 0 {
				if v, err := strconv.ParseInt(fields[0], 10, 64); err == nil {
					mem[key] = v * 1024
				}
			}
		}
	}
	uptime := -1.0
	if data, err := os.ReadFile("/proc/uptime"); err == nil {
		if f := strings.Fields(string(data)); len(f) > 0 {
			if v, err := strconv.ParseFloat(f[0], 64); err == nil {
				uptime = v
			}
		}
	}
	load := []float64{0, 0, 0}
	if data, err := os.ReadFile("/proc/loadavg"); err == nil {
		for i, f := range strings.Fields(string(data)) {
			if i < 3 {
				load[i], _ = strconv.ParseFloat(f, 64)
			}
		}
	}
	cpus := numCPU()
	ch.result(map[string]any{
		"uptime":               uptime,
		"load":                 load,
		"memory":               mem,
		"time":                 now(),
		"agent_pid":            os.Getpid(),
		"agent_uptime":         now() - a.started,
		"background_processes": a.procs.running(),
		"cpus":                 cpus,
	})
	return nil
}

// numCPU is os.cpu_count(): the CPUs online (not the affinity mask Go's runtime.NumCPU reports).
func numCPU() int {
	data, err := os.ReadFile("/sys/devices/system/cpu/online")
	if err != nil {
		return 1
	}
	n := 0
	for _, part := range strings.Split(strings.TrimSpace(string(data)), ",") {
		lo, hi, found := strings.Cut(part, "-")
		a, err1 := strconv.Atoi(lo)
		b := a
		var err2 error
		if found {
			b, err2 = strconv.Atoi(hi)
		}
		if err1 == nil && err2 == nil && b >= a {
			n += b - a + 1
		}
	}
	if n == 0 {
		return 1
	}
	return n
}

func (a *Agent) opSync(ch *Channel, req map[string]any, payload []byte) error {
	t0 := mono()
	syscall.Sync()
	ch.result(map[string]any{"duration": mono() - t0})
	return nil
}

// number reads a JSON number that Python would take as int or float (bools are ints there).
func number(v any) (float64, bool) {
	switch x := v.(type) {
	case json.Number:
		f, err := x.Float64()
		return f, err == nil
	case bool:
		if x {
			return 1, true
		}
		return 0, true
	}
	return 0, false
}

func (a *Agent) opSetTime(ch *Channel, req map[string]any, payload []byte) error {
	raw := req["time"]
	target, ok := number(raw)
	if _, isBool := raw.(bool); !ok || isBool || target <= 0 {
		return badRequest("time must be a positive number of seconds since the epoch")
	}
	before := now()
	method := "dry-run"
	if !a.dryRun {
		ns := int64(target * 1e9)
		ts := syscall.Timespec{Sec: ns / 1e9, Nsec: ns % 1e9}
		if _, _, errno := syscall.Syscall(syscall.SYS_CLOCK_SETTIME, clockRealtime, uintptr(unsafe.Pointer(&ts)), 0); errno == 0 {
			method = "clock_settime"
		} else {
			cmd := exec.Command("date", "-s", "@"+strconv.FormatInt(int64(target), 10))
			if cmd.Run() != nil {
				return &opError{eInternal, "cannot set the guest clock (clock_settime and date -s both failed)"}
			}
			method = "date"
		}
	}
	ch.result(map[string]any{
		"applied": method != "dry-run",
		"method":  method,
		"target":  raw,
		"before":  before,
		"after":   now(),
		"delta":   target - before,
	})
	return nil
}

var urandomFd struct {
	sync.Mutex
	fd int // 0: not open yet
}

// urandom is a /dev/urandom descriptor kept open (close-on-exec): a reseed follows every restore,
// and opening the device (a path walk and a device open, re-translated after each restore under
// TCG) then cost more than the ioctls themselves. The agent opens it at start, so it is open in
// every guest restored from a snapshot.
func urandom() (int, error) {
	urandomFd.Lock()
	defer urandomFd.Unlock()
	if urandomFd.fd == 0 {
		fd, err := syscall.Open("/dev/urandom", syscall.O_WRONLY|syscall.O_CLOEXEC, 0)
		if err != nil {
			return 0, err
		}
		urandomFd.fd = fd
	}
	return urandomFd.fd, nil
}

func (a *Agent) opReseed(ch *Channel, req map[string]any, payload []byte) error {
	hostname, present := req["hostname"]
	if present && hostname != nil {
		s, ok := hostname.(string)
		if !ok || len(s) == 0 || len(s) > 64 || strings.ContainsRune(s, 0) {
			return badRequest("hostname must be a string of 1 to 64 bytes without NUL")
		}
	}
	if len(payload) < 16 || len(payload) > reseedMaxBytes {
		return badRequest("send 16 to %d random bytes as the payload", reseedMaxBytes)
	}
	reseeded := false
	if !a.dryRun {
		fd, err := urandom()
		if err != nil {
			return &opError{eInternal, "/dev/urandom: " + err.Error()}
		}
		info := make([]byte, 8+len(payload)) // struct rand_pool_info
		*(*int32)(unsafe.Pointer(&info[0])) = int32(len(payload) * 8)
		*(*int32)(unsafe.Pointer(&info[4])) = int32(len(payload))
		copy(info[8:], payload)
		_, _, errno := syscall.Syscall(syscall.SYS_IOCTL, uintptr(fd), rndAddEntropy, uintptr(unsafe.Pointer(&info[0])))
		if errno != 0 {
			return &opError{eInternal, "RNDADDENTROPY: " + errno.Error()}
		}
		if _, _, errno = syscall.Syscall(syscall.SYS_IOCTL, uintptr(fd), rndReseedCRNG, 0); errno == 0 {
			reseeded = true
		}
		if s, ok := hostname.(string); ok {
			if err := syscall.Sethostname([]byte(s)); err != nil {
				return &opError{eInternal, "sethostname: " + err.Error()}
			}
		}
	}
	ch.result(map[string]any{
		"credited_bits": len(payload) * 8,
		"reseeded":      reseeded,
		"hostname":      hostname,
		"dry_run":       a.dryRun,
	})
	return nil
}
