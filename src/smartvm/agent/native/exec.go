// The exec op, natively: request checks, the guest account lookup (/etc/passwd, /etc/group), the
// spawn (own session, 1 MiB output pipes), the output pump with its bulk pause and exit linger,
// the held "started" event, timeout and CANCEL (SIGKILL to the process group). It follows guest.py's
// op_exec, _spawn_spec, _lookup_user, _spawn and Proc.pump so that replies are identical.
package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"
)

const (
	defaultPath  = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	exitLinger   = 2 * time.Second
	pipeSize     = 1024 * 1024
	bulkPause    = time.Millisecond
	startedHold  = 10 * time.Millisecond
	fSetPipeSz   = 1031
	sysPidfdOpen = 434                     // the same number on amd64 and arm64
	maxTimeout   = 100 * 365 * 24 * 3600.0 // seconds; more would overflow a time.Duration
)

type guestUser struct {
	uid, gid   int
	name, home string
	groups     []int
}

// smallFileCache keeps /etc/passwd and /etc/group between commands: a stat tells whether a file
// changed (one system call instead of four; under TCG each costs tens of microseconds).
var smallFileCache struct {
	sync.Mutex
	files map[string]cachedFile
}

type cachedFile struct {
	ino, size, mtime int64
	data             []byte
}

// readCached is os.ReadFile, served from memory while the file's inode, size and mtime are the same.
func readCached(path string) ([]byte, error) {
	var st syscall.Stat_t
	if err := rawStat(path, &st); err != nil {
		return nil, err
	}
	key := cachedFile{ino: int64(st.Ino), size: st.Size, mtime: st.Mtim.Nano()}
	smallFileCache.Lock()
	hit, ok := smallFileCache.files[path]
	smallFileCache.Unlock()
	if ok && hit.ino == key.ino && hit.size == key.size && hit.mtime == key.mtime {
		return hit.data, nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	if int64(len(data)) == key.size { // not rewritten while we read it
		key.data = data
		smallFileCache.Lock()
		if smallFileCache.files == nil {
			smallFileCache.files = map[string]cachedFile{}
		}
		smallFileCache.files[path] = key
		smallFileCache.Unlock()
	}
	return data, nil
}

// passwdEntry finds a line of /etc/passwd by name or uid.
func passwdEntry(match func(name string, uid int) bool) (guestUser, bool) {
	data, err := readCached("/etc/passwd")
	if err != nil {
		return guestUser{}, false
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Split(line, ":")
		if len(f) < 7 {
			continue
		}
		uid, err1 := strconv.Atoi(f[2])
		gid, err2 := strconv.Atoi(f[3])
		if err1 != nil || err2 != nil {
			continue
		}
		if match(f[0], uid) {
			return guestUser{uid: uid, gid: gid, name: f[0], home: f[5]}, true
		}
	}
	return guestUser{}, false
}

// groupList is getgrouplist(name, gid): the primary group, then every group listing the user.
func groupList(name string, gid int) []int {
	out := []int{gid}
	data, err := readCached("/etc/group")
	if err != nil {
		return out
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Split(line, ":")
		if len(f) < 4 {
			continue
		}
		g, err := strconv.Atoi(f[2])
		if err != nil || g == gid {
			continue
		}
		for _, m := range strings.Split(f[3], ",") {
			if m == name {
				out = append(out, g)
				break
			}
		}
	}
	return out
}

// lookupUser is guest.py's _lookup_user: nil is the agent's own user.
func lookupUser(user any) (guestUser, error) {
	if user == nil {
		uid := os.Getuid()
		if uid == 0 {
			return guestUser{0, 0, "root", "/root", nil}, nil
		}
		if u, ok := passwdEntry(func(_ string, id int) bool { return id == uid }); ok {
			return u, nil
		}
		return guestUser{uid, os.Getgid(), strconv.Itoa(uid), "/", nil}, nil
	}
	var u guestUser
	var ok bool
	uid, isUID := uidOf(user)
	if isUID {
		if u, ok = passwdEntry(func(_ string, id int) bool { return id == uid }); !ok {
			return guestUser{uid, uid, strconv.Itoa(uid), "/", nil}, nil
		}
	} else if name, isName := user.(string); isName {
		if u, ok = passwdEntry(func(n string, _ int) bool { return n == name }); !ok {
			return u, badRequest("unknown user %s in the guest", pyRepr(name))
		}
	} else {
		return u, badRequest("user must be a uid (int) or a user name (str)")
	}
	u.groups = groupList(u.name, u.gid)
	return u, nil
}

// uidOf: an integer JSON number or a string of ASCII digits.
func uidOf(user any) (int, bool) {
	var s string
	switch x := user.(type) {
	case string:
		if x == "" {
			return 0, false
		}
		for _, r := range x {
			if r < '0' || r > '9' {
				return 0, false
			}
		}
		s = x
	case interface{ String() string }: // json.Number
		s = x.String()
	default:
		return 0, false
	}
	v, err := strconv.Atoi(s)
	return v, err == nil
}

type spawnSpec struct {
	argv       []string
	env        []string
	cwd        string
	cred       *syscall.Credential
	lookupPath string
}

func buildSpec(req map[string]any) (*spawnSpec, error) {
	spec := &spawnSpec{}
	switch cmd := req["cmd"].(type) {
	case string:
		spec.argv = []string{"/bin/sh", "-c", cmd}
	case []any:
		for _, v := range cmd {
			s, ok := v.(string)
			if !ok {
				spec.argv = nil
				break
			}
			spec.argv = append(spec.argv, s)
		}
		if len(spec.argv) == 0 || len(spec.argv) != len(cmd) {
			return nil, badRequest("cmd must be a non-empty list of strings")
		}
	default:
		return nil, badRequest("cmd must be a non-empty list of strings")
	}
	user := req["user"]
	account, err := lookupUser(user)
	if err != nil {
		return nil, err
	}
	if user != nil {
		groups := make([]uint32, len(account.groups))
		for i, g := range account.groups {
			groups[i] = uint32(g)
		}
		spec.cred = &syscall.Credential{Uid: uint32(account.uid), Gid: uint32(account.gid), Groups: groups}
	}
	keys := []string{"PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG"}
	env := map[string]string{"PATH": defaultPath, "HOME": account.home, "USER": account.name,
		"LOGNAME": account.name, "SHELL": "/bin/sh", "LANG": "C.UTF-8"}
	if extra := req["env"]; truthy(extra) {
		m, ok := extra.(map[string]any)
		if !ok {
			return nil, badRequest("env must be an object of strings")
		}
		names := make([]string, 0, len(m))
		for k := range m {
			names = append(names, k)
		}
		sort.Strings(names)
		for _, k := range names {
			switch v := m[k].(type) {
			case nil:
				delete(env, k)
			case string:
				if strings.Contains(k, "=") || strings.ContainsRune(k+v, 0) {
					return nil, badRequest("env entry %s must map a name to a string", pyRepr(k))
				}
				if _, seen := env[k]; !seen {
					keys = append(keys, k)
				}
				env[k] = v
			default:
				return nil, badRequest("env entry %s must map a name to a string", pyRepr(k))
			}
		}
	}
	for _, k := range keys {
		if v, ok := env[k]; ok {
			spec.env = append(spec.env, k+"="+v)
		}
	}
	cwd, present := req["cwd"]
	if present && cwd != nil {
		if _, ok := cwd.(string); !ok {
			return nil, badRequest("cwd must be a string")
		}
	}
	if s, _ := cwd.(string); s != "" {
		spec.cwd = s
	} else if isDir(account.home) {
		spec.cwd = account.home
	} else {
		spec.cwd = "/"
	}
	if p, ok := env["PATH"]; ok {
		spec.lookupPath = p
	} else {
		spec.lookupPath = "/bin:/usr/bin"
	}
	return spec, nil
}

// isDir: path is a directory (following symlinks).
func isDir(path string) bool {
	var st syscall.Stat_t
	return rawStat(path, &st) == nil && st.Mode&syscall.S_IFMT == syscall.S_IFDIR
}

func truthy(v any) bool {
	switch x := v.(type) {
	case nil:
		return false
	case bool:
		return x
	case string:
		return x != ""
	case []any:
		return len(x) > 0
	case map[string]any:
		return len(x) > 0
	case interface{ String() string }:
		f, _ := number(x)
		return f != 0
	}
	return true
}

// resolve finds the program as execvpe would with this PATH: the path, or the errno of the failure.
func resolve(name, path string) (string, syscall.Errno) {
	dirs := []string{""}
	if !strings.Contains(name, "/") {
		dirs = strings.Split(path, ":")
	}
	saved := syscall.ENOENT
	for _, dir := range dirs {
		candidate := name
		if dir != "" {
			candidate = filepath.Join(dir, name)
		}
		err := rawAccess(candidate, 1) // X_OK (a directory passes; its execve fails with EACCES)
		if err == nil {
			return candidate, 0
		}
		if errno, ok := err.(syscall.Errno); ok && errno != syscall.ENOENT && errno != syscall.ENOTDIR {
			saved = errno
		}
	}
	return "", saved
}

// proc is a running command with its output pipes.
type proc struct {
	pid      int
	stdin    *rawFile
	stdinMu  sync.Mutex
	out, err *rawFile
}

func (p *proc) killGroup() { _ = syscall.Kill(-p.pid, syscall.SIGKILL) }

func (p *proc) closeStdin() {
	p.stdinMu.Lock()
	defer p.stdinMu.Unlock()
	if p.stdin != nil {
		p.stdin.Close()
		p.stdin = nil
	}
}

var devNullOnce struct {
	sync.Once
	fd  int
	err error
}

// devNull is one /dev/null fd, kept open (close-on-exec) for every command's stdin.
func devNull() (int, error) {
	devNullOnce.Do(func() {
		devNullOnce.fd, devNullOnce.err = syscall.Open("/dev/null", syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
	})
	return devNullOnce.fd, devNullOnce.err
}

func pipePair() (r, w int, err error) {
	var fds [2]int
	if err = syscall.Pipe2(fds[:], syscall.O_CLOEXEC); err != nil {
		return 0, 0, err
	}
	return fds[0], fds[1], nil
}

// start spawns the command; a missing/unrunnable program is reported like a shell (127/126).
func start(spec *spawnSpec, keepStdin bool) (*proc, *spawnFailure, error) {
	prog := spec.argv[0]
	exe, errno := resolve(prog, spec.lookupPath)
	if errno != 0 {
		return nil, &spawnFailure{prog, errno}, nil
	}
	var fds []int
	closeAll := func() {
		for _, fd := range fds {
			rawClose(fd)
		}
	}
	outR, outW, err := pipePair()
	if err != nil {
		return nil, nil, &opError{eSpawn, "pipe: " + err.Error()}
	}
	fds = append(fds, outR, outW)
	errR, errW, err := pipePair()
	if err != nil {
		closeAll()
		return nil, nil, &opError{eSpawn, "pipe: " + err.Error()}
	}
	fds = append(fds, errR, errW)
	var inR, inW int
	if keepStdin {
		if inR, inW, err = pipePair(); err != nil {
			closeAll()
			return nil, nil, &opError{eSpawn, "pipe: " + err.Error()}
		}
	} else if inR, err = devNull(); err != nil {
		closeAll()
		return nil, nil, &opError{eSpawn, "/dev/null: " + err.Error()}
	}
	if keepStdin {
		fds = append(fds, inR)
	}
	for _, fd := range []int{outR, errR} {
		syscall.RawSyscall(syscall.SYS_FCNTL, uintptr(fd), fSetPipeSz, pipeSize)
	}
	attr := &syscall.ProcAttr{
		Dir:   spec.cwd,
		Env:   spec.env,
		Files: []uintptr{uintptr(inR), uintptr(outW), uintptr(errW)},
		Sys:   &syscall.SysProcAttr{Setsid: true, Credential: spec.cred},
	}
	pid, err := syscall.ForkExec(exe, spec.argv, attr)
	rawClose(outW)
	rawClose(errW)
	if keepStdin {
		rawClose(inR)
	}
	if err != nil {
		rawClose(outR)
		rawClose(errR)
		if keepStdin {
			rawClose(inW)
		}
		// the directory is checked only now (one system call less per command; TCG makes each costly)
		if st, serr := os.Stat(spec.cwd); serr != nil || !st.IsDir() {
			e := syscall.ENOTDIR
			var pe *os.PathError
			if errors.As(serr, &pe) {
				e, _ = pe.Err.(syscall.Errno)
			}
			return nil, nil, &opError{eSpawn, fmt.Sprintf("cannot start %s: %s (%s)", pyRepr(prog), strerror(e), spec.cwd)}
		}
		if e, ok := err.(syscall.Errno); ok && (e == syscall.ENOENT || e == syscall.EACCES || e == syscall.ENOEXEC) {
			return nil, &spawnFailure{prog, e}, nil
		}
		return nil, nil, &opError{eSpawn, fmt.Sprintf("cannot start %s: %s", pyRepr(prog), err)}
	}
	p := &proc{pid: pid}
	p.out, _ = newRawFile(outR, "stdout")
	p.err, _ = newRawFile(errR, "stderr")
	if keepStdin {
		p.stdin, _ = newRawFile(inW, "stdin")
	}
	return p, nil, nil
}

type spawnFailure struct {
	prog  string
	errno syscall.Errno
}

func strerror(e syscall.Errno) string {
	s := e.Error()
	if s == "" {
		return s
	}
	return strings.ToUpper(s[:1]) + s[1:]
}

// report sends what a shell would: a message on stderr and exit 127 (not found) or 126.
func (f *spawnFailure) report(ch *Channel) {
	code, what := 126, strerror(f.errno)
	if f.errno == syscall.ENOENT {
		code, what = 127, "command not found"
	}
	ch.data("stderr", []byte(fmt.Sprintf("smartvm-agent: %s: %s\n", f.prog, what)), false)
	ch.result(map[string]any{"exit_code": code, "signal": nil, "timed_out": false, "duration": pyFloat(0), "pid": nil})
}

// requestTimeout is the optional "timeout" field: a positive number of seconds (0: none).
func requestTimeout(req map[string]any) (float64, error) {
	raw, ok := req["timeout"]
	if !ok || raw == nil {
		return 0, nil
	}
	t, isNum := number(raw)
	if !isNum || t <= 0 {
		return 0, badRequest("timeout must be a positive number of seconds")
	}
	return t, nil
}

// exitOf is a wait status as the agent reports it: the exit code (128+N for signal N) and the signal.
func exitOf(status syscall.WaitStatus) (int, any) {
	if status.Signaled() {
		s := int(status.Signal())
		return 128 + s, s
	}
	return status.ExitStatus(), nil
}

func (a *Agent) opExec(ch *Channel, req map[string]any, payload []byte) error {
	timeout, err := requestTimeout(req)
	if err != nil {
		return err
	}
	wantStdin := truthy(req["stdin"])
	spec, err := buildSpec(req)
	if err != nil {
		return err
	}
	t0 := mono()
	p, failure, err := start(spec, wantStdin)
	if err != nil {
		return err
	}
	if failure != nil {
		failure.report(ch)
		return nil
	}
	ch.onCancel(p.killGroup)
	ch.holdEvent(map[string]any{"event": "started", "pid": p.pid})
	if wantStdin {
		go feedStdin(ch, p)
	}
	killed, status := pump(p, ch.sendData, timeout, ch.flush)
	duration := mono() - t0
	exitCode, sig := exitOf(status)
	cancelled := ch.isCancelled()
	timedOut := killed && !cancelled
	if timedOut {
		exitCode = 124
	}
	res := map[string]any{"exit_code": exitCode, "signal": sig, "timed_out": timedOut, "duration": duration,
		"pid": p.pid}
	if cancelled && !timedOut {
		res["cancelled"] = true
	}
	p.closeStdin()
	ch.result(res)
	return nil
}

func feedStdin(ch *Channel, p *proc) {
	defer p.closeStdin()
	for {
		it, ok := ch.nextData()
		if !ok {
			return
		}
		p.stdinMu.Lock()
		pipe := p.stdin
		p.stdinMu.Unlock()
		// the pipe is pollable: closeStdin (cancel, exit) interrupts a write the command never reads
		if pipe != nil && len(it.payload) > 0 {
			if err := pipe.WriteParts([][]byte{it.payload}); err != nil {
				p.closeStdin()
			}
		}
		if eof, _ := it.header["eof"].(bool); eof {
			return
		}
	}
}

// emitter takes a piece of a command's output; the piece is only valid during the call.
type emitter func(stream string, data []byte)

// readPipe hands one pipe's output to emit until EOF (or until the pipe is closed under it).
// gone is closed when the command has exited: from then on there is nothing to wait for.
func readPipe(emit emitter, f *rawFile, stream string, gone <-chan struct{}, done chan<- struct{}) {
	defer close(done)
	buf := getBuffer()
	defer putBuffer(buf)
	for {
		n, err := f.Read(buf)
		if n > 0 {
			emit(stream, buf[:n]) // done with it when it returns: the buffer can be reused
		}
		if err != nil || n == 0 {
			return
		}
		if n < chunkSize {
			// we drained the pipe: let the writer fill it for a moment, so that a command writing
			// many small pieces (busybox head writes byte by byte) costs a frame per millisecond, not
			// one per write (the Python agent's own slowness batched those; a fast reader must pause)
			// ... but not past the command's exit (its last words would wait for nothing)
			select {
			case <-gone:
			default:
				pause := time.NewTimer(bulkPause)
				select {
				case <-pause.C:
				case <-gone:
					pause.Stop()
				}
			}
		}
	}
}

// pump moves the output until the command has exited and its pipes are closed (or exitLinger after
// its exit, if children hold them), killing the group at the timeout (0: none). quiet (if not nil)
// runs once startedHold after the start unless the output is over by then. Returns (killed, status).
func pump(p *proc, emit emitter, timeout float64, quiet func()) (bool, syscall.WaitStatus) {
	outDone, errDone := make(chan struct{}), make(chan struct{})
	gone := make(chan struct{})
	go readPipe(emit, p.out, "stdout", gone, outDone)
	go readPipe(emit, p.err, "stderr", gone, errDone)
	exited := make(chan syscall.WaitStatus, 1)
	go func() {
		status := waitExit(p.pid)
		close(gone)
		exited <- status
	}()
	var deadline <-chan time.Time
	if timeout > 0 {
		if timeout > maxTimeout {
			timeout = maxTimeout
		}
		timer := time.NewTimer(time.Duration(timeout * float64(time.Second)))
		defer timer.Stop()
		deadline = timer.C
	}
	var hold <-chan time.Time
	if quiet != nil {
		holdTimer := time.NewTimer(startedHold)
		defer holdTimer.Stop()
		hold = holdTimer.C
	}
	var linger <-chan time.Time
	var status syscall.WaitStatus
	killed, hasExited := false, false
	oc, ec := (<-chan struct{})(outDone), (<-chan struct{})(errDone)
	for oc != nil || ec != nil {
		select {
		case <-hold:
			quiet()
		case <-deadline:
			killed = true
			deadline = nil
			p.killGroup()
		case status = <-exited:
			hasExited = true
			lingerTimer := time.NewTimer(exitLinger)
			defer lingerTimer.Stop() // a pending timer per command would wake the runtime later
			linger = lingerTimer.C
		case <-linger:
			oc, ec = nil, nil
		case <-oc:
			oc = nil
		case <-ec:
			ec = nil
		}
	}
	p.out.Close()
	p.err.Close()
	<-outDone
	<-errDone
	if !hasExited {
		status = <-exited
	}
	return killed, status
}

// waitExit reaps the process. It waits on a pidfd through the netpoller where the kernel has pidfds
// (5.3+): a goroutine blocked in wait4(2) would hold the only P of a 1-vCPU guest until sysmon takes
// it back, up to 10 ms later, delaying the output pump and every other request.
func waitExit(pid int) syscall.WaitStatus {
	var ws syscall.WaitStatus
	fd, _, e := syscall.RawSyscall(sysPidfdOpen, uintptr(pid), syscall.O_NONBLOCK, 0) // PIDFD_NONBLOCK: 5.10+
	if e == syscall.EINVAL {
		fd, _, e = syscall.RawSyscall(sysPidfdOpen, uintptr(pid), 0, 0)
	}
	if e == 0 {
		if f, err := newRawFile(int(fd), "pidfd"); err == nil {
			defer f.Close()
			reaped := false
			err = f.rc.Read(func(uintptr) bool {
				got, _, e := syscall.RawSyscall6(syscall.SYS_WAIT4, uintptr(pid), uintptr(unsafe.Pointer(&ws)), syscall.WNOHANG, 0, 0, 0)
				if e == syscall.EINTR {
					return false
				}
				reaped = int(got) == pid || e != 0
				return reaped
			})
			if err == nil && reaped {
				return ws
			}
		}
	}
	for {
		if _, err := syscall.Wait4(pid, &ws, 0, nil); err != syscall.EINTR {
			return ws
		}
	}
}

// Output read buffers are reused: a fresh 256 KiB buffer per stream per command is zeroed and
// page-faulted in each time, which under TCG cost milliseconds per exec, and feeds the GC.
var buffers = make(chan []byte, 16)

func getBuffer() []byte {
	select {
	case b := <-buffers:
		return b
	default:
		return make([]byte, chunkSize)
	}
}

func putBuffer(b []byte) {
	select {
	case buffers <- b:
	default:
	}
}
