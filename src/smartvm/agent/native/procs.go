// Background processes, natively: proc_start and proc_run start them, proc_list, proc_stdin,
// proc_signal and proc_attach act on them. A background process outlives its request: its output
// goes to the channels attached to it and to a replay buffer (for a later attach), and the agent's
// table keeps it until it is one of more than maxFinishedProcs finished ones. Same fields, checks
// and messages as guest.py's Proc and op_proc_*, so the host cannot tell the agents apart.
package main

import (
	"encoding/json"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

const (
	replayBytes      = 1024 * 1024 // output kept per background process for attach(replay=True)
	maxFinishedProcs = 64
)

type outChunk struct {
	stream string
	data   []byte
}

// bgProc is a background process: its output fan-out and, once it has exited, how it ended.
type bgProc struct {
	*proc
	argv    []string
	meta    any
	started float64 // wall clock
	t0      float64 // monotonic

	emitMu      sync.Mutex // sinks and replay; held while a piece goes out, so a detach is final
	sinks       []*Channel
	replay      []outChunk
	replaySize  int
	replayLimit int
	dropped     atomic.Int64
	writeMu     sync.Mutex // one proc_stdin write at a time

	stateMu  sync.Mutex
	finished bool
	exitCode int
	signal   any
	ended    float64
	duration float64
	done     chan struct{} // closed once finished
}

func newBgProc(p *proc, spec *spawnSpec, req map[string]any, replay int) *bgProc {
	return &bgProc{proc: p, argv: spec.argv, meta: req["meta"], started: now(), t0: mono(),
		replayLimit: replay, done: make(chan struct{})}
}

// attach sends the output to ch from now on (after what the replay buffer holds, if replay).
func (b *bgProc) attach(ch *Channel, replay bool) {
	b.emitMu.Lock()
	defer b.emitMu.Unlock()
	if replay {
		for _, c := range b.replay {
			ch.sendData(c.stream, c.data)
		}
	}
	b.sinks = append(b.sinks, ch)
}

// detach stops sending output to ch; no piece goes to it once this returns.
func (b *bgProc) detach(ch *Channel) {
	b.emitMu.Lock()
	defer b.emitMu.Unlock()
	kept := b.sinks[:0]
	for _, s := range b.sinks {
		if s != ch {
			kept = append(kept, s)
		}
	}
	b.sinks = kept
}

// emit is the pump's emitter: the replay buffer keeps a copy, every attached channel gets it.
func (b *bgProc) emit(stream string, data []byte) {
	b.emitMu.Lock()
	defer b.emitMu.Unlock()
	if b.replayLimit > 0 {
		b.replay = append(b.replay, outChunk{stream, append([]byte(nil), data...)})
		b.replaySize += len(data)
		for b.replaySize > b.replayLimit && len(b.replay) > 1 {
			b.replaySize -= len(b.replay[0].data)
			b.dropped.Add(int64(len(b.replay[0].data)))
			b.replay[0] = outChunk{}
			b.replay = b.replay[1:]
		}
	}
	for _, ch := range b.sinks {
		ch.sendData(stream, data)
	}
}

// run pumps the output until the process is over (killing its group at the timeout, 0: none) and
// records how it ended; returns whether the timeout killed it.
func (b *bgProc) run(timeout float64) bool {
	killed, status := pump(b.proc, b.emit, timeout, nil)
	code, sig := exitOf(status)
	b.stateMu.Lock()
	b.finished, b.exitCode, b.signal = true, code, sig
	b.ended, b.duration = now(), mono()-b.t0
	b.stateMu.Unlock()
	close(b.done)
	return killed
}

func (b *bgProc) isFinished() bool {
	b.stateMu.Lock()
	defer b.stateMu.Unlock()
	return b.finished
}

func (b *bgProc) info() map[string]any {
	b.stdinMu.Lock()
	stdinOpen := b.stdin != nil
	b.stdinMu.Unlock()
	b.stateMu.Lock()
	defer b.stateMu.Unlock()
	var exitCode, ended, duration any
	if b.finished {
		exitCode, ended, duration = b.exitCode, b.ended, b.duration
	}
	return map[string]any{
		"pid": b.pid, "cmd": b.argv, "running": !b.finished, "exit_code": exitCode, "signal": b.signal,
		"started": b.started, "ended": ended, "duration": duration, "stdin_open": stdinOpen,
		"dropped": b.dropped.Load(), "meta": b.meta,
	}
}

// writeStdin writes to the process's stdin (closing it after, if eof). Writing to a closed stdin is
// a bad request; a process that stopped reading (broken pipe) just gets its stdin closed.
func (b *bgProc) writeStdin(data []byte, eof bool) error {
	b.writeMu.Lock()
	defer b.writeMu.Unlock()
	b.stdinMu.Lock()
	pipe := b.stdin
	b.stdinMu.Unlock()
	if pipe == nil {
		if len(data) > 0 {
			return badRequest("stdin of process %d is closed", b.pid)
		}
		return nil
	}
	if len(data) > 0 {
		if err := pipe.WriteParts([][]byte{data}); err != nil {
			b.closeStdin()
			return nil
		}
	}
	if eof {
		b.closeStdin()
	}
	return nil
}

// procTable is the agent's background processes in the order they started.
type procTable struct {
	mu    sync.Mutex
	byPid map[int]*bgProc
	order []*bgProc
}

// add tracks b; only the newest maxFinishedProcs finished processes are kept.
func (t *procTable) add(b *bgProc) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.byPid == nil {
		t.byPid = map[int]*bgProc{}
	}
	if old := t.byPid[b.pid]; old != nil { // a reused pid: the older process is gone for good
		t.order = without(t.order, old)
	}
	t.byPid[b.pid] = b
	t.order = append(t.order, b)
	var finished []*bgProc
	for _, p := range t.order {
		if p.isFinished() {
			finished = append(finished, p)
		}
	}
	for _, old := range finished[:max(0, len(finished)-maxFinishedProcs)] {
		t.order = without(t.order, old)
		delete(t.byPid, old.pid)
		old.closeStdin()
	}
}

func without(list []*bgProc, drop *bgProc) []*bgProc {
	out := list[:0]
	for _, p := range list {
		if p != drop {
			out = append(out, p)
		}
	}
	return out
}

func max(a, b int) int {
	if a > b {
		return a
	}
	return b
}

func (t *procTable) all() []*bgProc {
	t.mu.Lock()
	defer t.mu.Unlock()
	return append([]*bgProc(nil), t.order...)
}

func (t *procTable) running() int {
	n := 0
	for _, p := range t.all() {
		if !p.isFinished() {
			n++
		}
	}
	return n
}

// lookup is the process named by the request's "pid" (an integer), or a no_such_process error.
func (t *procTable) lookup(req map[string]any) (*bgProc, error) {
	raw := req["pid"]
	if num, ok := raw.(json.Number); ok {
		if pid, err := strconv.Atoi(num.String()); err == nil {
			t.mu.Lock()
			b := t.byPid[pid]
			t.mu.Unlock()
			if b != nil {
				return b, nil
			}
		}
	}
	return nil, &opError{eNoProcess, "no background process with pid " + pyRepr(raw)}
}

// replayOption is an optional non-negative integer byte count.
func replayOption(req map[string]any, fallback int) (int, error) {
	raw, ok := req["replay_bytes"]
	if !ok {
		return fallback, nil
	}
	if num, isNum := raw.(json.Number); isNum {
		if n, err := strconv.Atoi(num.String()); err == nil && n >= 0 {
			return n, nil
		}
	}
	return 0, badRequest("replay_bytes must be a non-negative integer")
}

// spawnBackground starts the request's command as a background process; nil (and the failure
// already answered, exit 127/126 as a shell would) if the program cannot be run.
func spawnBackground(ch *Channel, req map[string]any, replay int) (*bgProc, error) {
	spec, err := buildSpec(req)
	if err != nil {
		return nil, err
	}
	p, failure, err := start(spec, truthy(req["stdin"]))
	if err != nil {
		return nil, err
	}
	if failure != nil {
		failure.report(ch)
		return nil, nil
	}
	return newBgProc(p, spec, req, replay), nil
}

func (a *Agent) opProcStart(ch *Channel, req map[string]any, payload []byte) error {
	replay, err := replayOption(req, replayBytes)
	if err != nil {
		return err
	}
	b, err := spawnBackground(ch, req, replay)
	if b == nil {
		return err
	}
	go b.run(0)
	a.procs.add(b)
	ch.result(b.info())
	return nil
}

// opProcRun starts a background process and streams its output on this channel until it exits.
// Unlike exec, CANCEL only detaches: the process keeps running, listed, attachable and signallable;
// the timeout kills its group whether or not anyone is attached (E2B envd's Start).
func (a *Agent) opProcRun(ch *Channel, req map[string]any, payload []byte) error {
	timeout, err := requestTimeout(req)
	if err != nil {
		return err
	}
	replay, err := replayOption(req, 0)
	if err != nil {
		return err
	}
	b, err := spawnBackground(ch, req, replay)
	if b == nil {
		return err
	}
	var answered sync.Once
	answer := func(timedOut bool) {
		answered.Do(func() {
			b.detach(ch)
			info := b.info()
			info["timed_out"] = timedOut
			if ch.isCancelled() {
				info["detached"] = true
			}
			ch.result(info)
		})
	}
	b.attach(ch, false)
	a.procs.add(b)
	ch.sendNow(outFrame{fEvent, map[string]any{"event": "started", "pid": b.pid}, nil})
	ch.onCancel(func() { go answer(false) })
	answer(b.run(timeout))
	return nil
}

func (a *Agent) opProcList(ch *Channel, req map[string]any, payload []byte) error {
	procs := a.procs.all()
	out := make([]any, 0, len(procs))
	for _, p := range procs {
		out = append(out, p.info())
	}
	ch.result(map[string]any{"processes": out})
	return nil
}

func (a *Agent) opProcStdin(ch *Channel, req map[string]any, payload []byte) error {
	b, err := a.procs.lookup(req)
	if err != nil {
		return err
	}
	if err := b.writeStdin(payload, truthy(req["eof"])); err != nil {
		return err
	}
	ch.result(map[string]any{"written": len(payload)})
	return nil
}

// signalNumbers are the names Python's signal.Signals knows on Linux.
var signalNumbers = map[string]int{
	"SIGHUP": 1, "SIGINT": 2, "SIGQUIT": 3, "SIGILL": 4, "SIGTRAP": 5, "SIGABRT": 6, "SIGIOT": 6,
	"SIGBUS": 7, "SIGFPE": 8, "SIGKILL": 9, "SIGUSR1": 10, "SIGSEGV": 11, "SIGUSR2": 12, "SIGPIPE": 13,
	"SIGALRM": 14, "SIGTERM": 15, "SIGSTKFLT": 16, "SIGCHLD": 17, "SIGCLD": 17, "SIGCONT": 18,
	"SIGSTOP": 19, "SIGTSTP": 20, "SIGTTIN": 21, "SIGTTOU": 22, "SIGURG": 23, "SIGXCPU": 24,
	"SIGXFSZ": 25, "SIGVTALRM": 26, "SIGPROF": 27, "SIGWINCH": 28, "SIGIO": 29, "SIGPOLL": 29,
	"SIGPWR": 30, "SIGSYS": 31, "SIGRTMIN": 34, "SIGRTMAX": 64,
}

// signalOf is an integer signal number or a signal name (any case).
func signalOf(raw any) (int, bool) {
	switch x := raw.(type) {
	case json.Number:
		n, err := strconv.Atoi(x.String())
		if err == nil {
			return n, true
		}
		n, ok := signalNumbers[strings.ToUpper(x.String())]
		return n, ok
	case string:
		n, ok := signalNumbers[strings.ToUpper(x)]
		return n, ok
	}
	return 0, false
}

func (a *Agent) opProcSignal(ch *Channel, req map[string]any, payload []byte) error {
	b, err := a.procs.lookup(req)
	if err != nil {
		return err
	}
	raw, given := req["signal"]
	if !given {
		raw = "SIGTERM"
	}
	signum, ok := signalOf(raw)
	if !ok {
		return badRequest("unknown signal %s", pyRepr(raw))
	}
	if !b.isFinished() {
		target := b.pid
		if group, set := req["group"]; !set || truthy(group) {
			target = -b.pid
		}
		if err := syscall.Kill(target, syscall.Signal(signum)); err != nil && err != syscall.ESRCH {
			return osError(err, "proc_signal")
		}
	}
	ch.result(b.info())
	return nil
}

// opProcAttach streams a background process's output (after its replay buffer, unless replay is
// false) until it exits, the timeout passes, or the host cancels (then the answer says detached).
func (a *Agent) opProcAttach(ch *Channel, req map[string]any, payload []byte) error {
	b, err := a.procs.lookup(req)
	if err != nil {
		return err
	}
	wake := make(chan struct{})
	var once sync.Once
	ch.onCancel(func() { once.Do(func() { close(wake) }) })
	replay := true
	if v, set := req["replay"]; set {
		replay = truthy(v)
	}
	b.attach(ch, replay)
	var timeout <-chan time.Time
	if seconds, ok := req["timeout"].(json.Number); ok {
		if t, err := seconds.Float64(); err == nil {
			if t > maxTimeout {
				t = maxTimeout
			}
			timer := time.NewTimer(time.Duration(t * float64(time.Second)))
			defer timer.Stop()
			timeout = timer.C
		}
	}
	select {
	case <-wake:
	case <-b.done:
	case <-timeout:
	}
	b.detach(ch)
	info := b.info()
	if ch.isCancelled() {
		info["detached"] = true
	}
	ch.result(info)
	return nil
}
