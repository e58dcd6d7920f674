// The proxy: every op the native agent does not implement is served by the Python agent
// (guest.py), run as a child on a socketpair (`--serve-fd 3`). Requests of all host connections
// go to that one child (so background processes are shared, as in the Python agent), with channel
// ids renumbered so that two host connections cannot collide; the frames are relayed both ways
// unchanged except for the channel id, and the child's own HELLO is swallowed.
package main

import (
	"encoding/binary"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

const (
	socketBuffer = 4 * 1024 * 1024
	readyTimeout = 60 * time.Second
)

// proxiedOps are guest.py's ops that the native agent relays to it.
var proxiedOps = map[string]bool{
	"file_list": true, "file_stat": true,
	"file_mkdir": true, "file_remove": true, "file_rename": true, "user_info": true, "file_entries": true,
	"file_prepare": true, "file_watch": true, "shutdown": true,
}

type hostKey struct {
	conn *Conn
	id   uint32
}

// Proxy owns the Python child and the channel mapping.
type Proxy struct {
	python, agentFile string
	extraArgs         []string

	mu      sync.Mutex
	child   *childProc
	next    uint32
	byChild map[uint32]hostKey // where the child's frames of each child channel go
	byHost  map[hostKey]uint32

	readyOnce sync.Once
	ready     chan struct{} // closed once the first child said HELLO (or could not start, or died)
}

func (p *Proxy) markReady() { p.readyOnce.Do(func() { close(p.ready) }) }

// waitReady holds a session's HELLO until the Python part is up: a host that got the HELLO may use
// every op at once, as with the Python agent (its start costs a TCG guest a second or more).
func (p *Proxy) waitReady() {
	select {
	case <-p.ready:
	case <-time.After(readyTimeout):
		logf("the Python part did not start in %v; saying hello without it", readyTimeout)
		p.markReady()
	}
}

type childProc struct {
	pid  int
	sock *rawFile
	wmu  sync.Mutex
	dead bool
}

func newProxy(python, agentFile string, extraArgs []string) *Proxy {
	return &Proxy{python: python, agentFile: agentFile, extraArgs: extraArgs,
		byChild: map[uint32]hostKey{}, byHost: map[hostKey]uint32{}, ready: make(chan struct{})}
}

// ensure starts the child if none is running; call with p.mu held.
func (p *Proxy) ensure() (*childProc, error) {
	if p.child != nil && !p.child.dead {
		return p.child, nil
	}
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	for _, fd := range fds { // room for several 256 KiB chunks: fewer switches between the two agents
		// the FORCE variants pass net.core.[rw]mem_max (root in the guest may); else the capped size
		if syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_SNDBUFFORCE, socketBuffer) != nil {
			_ = syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_SNDBUF, socketBuffer)
		}
		if syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_RCVBUFFORCE, socketBuffer) != nil {
			_ = syscall.SetsockoptInt(fd, syscall.SOL_SOCKET, syscall.SO_RCVBUF, socketBuffer)
		}
	}
	devnull, err := syscall.Open("/dev/null", syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
	if err != nil {
		syscall.Close(fds[0])
		syscall.Close(fds[1])
		return nil, err
	}
	dir, file := filepath.Split(p.agentFile)
	module := strings.TrimSuffix(file, ".py")
	// imported, not run as a script, so the bytecode shipped next to it is used (as run-agent does)
	code := fmt.Sprintf("import sys; sys.path[0] = %q; import %s; sys.exit(%s.main())", filepath.Clean(dir), module, module)
	argv := append([]string{p.python, "-c", code, "--serve-fd", "3"}, p.extraArgs...)
	pid, err := syscall.ForkExec(p.python, argv, &syscall.ProcAttr{
		Env:   os.Environ(),
		Files: []uintptr{uintptr(devnull), 2, 2, uintptr(fds[1])},
		Sys:   &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL},
	})
	syscall.Close(devnull)
	syscall.Close(fds[1])
	if err != nil {
		syscall.Close(fds[0])
		return nil, fmt.Errorf("cannot start %s: %v", p.python, err)
	}
	sock, err := newRawFile(fds[0], "python-agent") // through the netpoller, see rawio.go
	if err != nil {
		syscall.Close(fds[0])
		syscall.Kill(pid, syscall.SIGKILL)
		syscall.Wait4(pid, nil, 0, nil)
		return nil, err
	}
	c := &childProc{pid: pid, sock: sock}
	p.child = c
	go p.readChild(c)
	return c, nil
}

// start launches the child ahead of the first proxied request.
func (p *Proxy) start() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if _, err := p.ensure(); err != nil {
		log.Printf("python agent: %v", err)
		p.markReady()
	}
}

func (c *childProc) write(parts ...[]byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.sock.WriteParts(parts)
}

// rawFrame re-encodes a frame for another channel id with its JSON header unchanged.
func rawFrame(f *Frame, channel uint32) [][]byte {
	head := make([]byte, headerSize, headerSize+len(f.Raw))
	copy(head, magic)
	head[4], head[5] = protocolVersion, byte(f.Type)
	binary.BigEndian.PutUint32(head[8:], channel)
	binary.BigEndian.PutUint32(head[12:], uint32(len(f.Raw)))
	binary.BigEndian.PutUint32(head[16:], uint32(len(f.Payload)))
	head = append(head, f.Raw...)
	if len(f.Payload) == 0 {
		return [][]byte{head}
	}
	return [][]byte{head, f.Payload}
}

// request relays a REQUEST of a host connection to the child.
func (p *Proxy) request(c *Conn, f *Frame) {
	p.mu.Lock()
	child, err := p.ensure()
	if err != nil {
		p.mu.Unlock()
		c.errorFrame(f.Channel, eInternal, "the guest agent cannot start its Python part: "+err.Error())
		return
	}
	p.next++
	id := p.next
	key := hostKey{c, f.Channel}
	p.byChild[id] = key
	p.byHost[key] = id
	p.mu.Unlock()
	if child.write(rawFrame(f, id)...) != nil {
		p.childGone(child)
	}
}

func (p *Proxy) has(c *Conn, id uint32) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	_, ok := p.byHost[hostKey{c, id}]
	return ok
}

// forward relays DATA/CANCEL of a proxied channel; false if the channel is not proxied.
func (p *Proxy) forward(c *Conn, f *Frame) bool {
	p.mu.Lock()
	id, ok := p.byHost[hostKey{c, f.Channel}]
	child := p.child
	p.mu.Unlock()
	if !ok || child == nil {
		return false
	}
	if child.write(rawFrame(f, id)...) != nil {
		p.childGone(child)
	}
	return true
}

// abandon cancels one proxied channel (a broken frame inside it); true if it was proxied.
func (p *Proxy) abandon(c *Conn, hostID uint32) bool {
	p.mu.Lock()
	id, ok := p.byHost[hostKey{c, hostID}]
	if ok {
		delete(p.byHost, hostKey{c, hostID})
		delete(p.byChild, id)
	}
	child := p.child
	p.mu.Unlock()
	if ok && child != nil {
		p.cancelChild(child, id)
	}
	return ok
}

func (p *Proxy) cancelChild(child *childProc, id uint32) {
	head, _ := encodeHead(fCancel, id, nil, 0)
	if child.write(head) != nil {
		p.childGone(child)
	}
}

// dropConn cancels every proxied channel of a connection (session end, or a host HELLO).
func (p *Proxy) dropConn(c *Conn) {
	p.mu.Lock()
	var ids []uint32
	for key, id := range p.byHost {
		if key.conn == c {
			ids = append(ids, id)
			delete(p.byHost, key)
			delete(p.byChild, id)
		}
	}
	child := p.child
	p.mu.Unlock()
	if child == nil {
		return
	}
	for _, id := range ids {
		p.cancelChild(child, id)
	}
}

// readChild relays the child's frames to their host channels until the child's stream ends.
func (p *Proxy) readChild(child *childProc) {
	var dec Decoder
	buf := make([]byte, 512*1024)
	for {
		n, err := child.sock.Read(buf)
		if n == 0 && err == nil {
			break // EOF: the child is gone
		}
		if n > 0 {
			for _, item := range dec.Feed(buf[:n]) {
				f, ok := item.(*Frame)
				if !ok {
					log.Printf("python agent stream: %s", item.(*FrameErr).Message)
					continue
				}
				p.relay(f)
			}
		}
		if err != nil {
			break
		}
	}
	p.childGone(child)
}

func (p *Proxy) relay(f *Frame) {
	if f.Channel == 0 {
		if f.Type == fError {
			log.Printf("python agent stream error: %s", f.Raw)
		}
		if f.Type == fHello {
			p.markReady()
		}
		return // its HELLO is swallowed: the host gets ours
	}
	final := f.Type == fResult || f.Type == fError
	p.mu.Lock()
	host, ok := p.byChild[f.Channel]
	if ok && final {
		delete(p.byChild, f.Channel)
		delete(p.byHost, host)
	}
	p.mu.Unlock()
	if !ok {
		return
	}
	host.conn.wlock.Lock()
	alive := host.conn.isAlive()
	if alive {
		if err := host.conn.t.Write(rawFrame(f, host.id)); err != nil {
			host.conn.mu.Lock()
			host.conn.alive = false
			host.conn.mu.Unlock()
		}
	}
	host.conn.wlock.Unlock()
}

// childGone fails every channel the child was serving; the next request starts a new child.
func (p *Proxy) childGone(child *childProc) {
	p.mu.Lock()
	if child.dead {
		p.mu.Unlock()
		return
	}
	child.dead = true
	p.markReady()
	child.sock.Close()
	routes := p.byChild
	p.byChild = map[uint32]hostKey{}
	p.byHost = map[hostKey]uint32{}
	p.mu.Unlock()
	var ws syscall.WaitStatus
	syscall.Kill(child.pid, syscall.SIGKILL)
	syscall.Wait4(child.pid, &ws, 0, nil)
	log.Printf("python agent (pid %d) exited", child.pid)
	for _, host := range routes {
		host.conn.errorFrame(host.id, eInternal, "the guest agent's Python part exited; retry the request")
	}
}
