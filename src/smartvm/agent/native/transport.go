// Transports: the virtio-serial ports of the QEMU engine (non-blocking, read with readv into many
// page buffers, written with writev, the first write of a session blocking until a host connects,
// as guest.py's _PortReader/_port_writer), plus a Unix socket listener and stdio for host tests.
package main

import (
	"errors"
	"net"
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

const portPages = 64

type pollFd struct {
	fd      int32
	events  int16
	revents int16
}

const (
	pollOut = 0x4
	pollHup = 0x10
)

func iovecs(parts [][]byte) []syscall.Iovec {
	iov := make([]syscall.Iovec, 0, len(parts))
	for _, b := range parts {
		if len(b) > 0 {
			v := syscall.Iovec{Base: &b[0]}
			v.SetLen(len(b))
			iov = append(iov, v)
		}
	}
	return iov
}

// writeSome writes parts with writev until all are written (nil) or the fd would block (EAGAIN);
// *parts is left holding what is still to write.
func writeSome(fd int, parts *[][]byte) error {
	for len(*parts) > 0 {
		iov := iovecs(*parts)
		if len(iov) == 0 {
			*parts = nil
			return nil
		}
		n, _, e := syscall.RawSyscall(syscall.SYS_WRITEV, uintptr(fd), uintptr(unsafe.Pointer(&iov[0])), uintptr(len(iov)))
		if e == syscall.EINTR {
			continue
		}
		if e != 0 {
			return e
		}
		written := int(n)
		p := *parts
		for written > 0 && len(p) > 0 {
			if written >= len(p[0]) {
				written -= len(p[0])
				p = p[1:]
			} else {
				p[0] = p[0][written:]
				written = 0
			}
		}
		for len(p) > 0 && len(p[0]) == 0 {
			p = p[1:]
		}
		*parts = p
	}
	return nil
}

// portSession is one session on a virtio-serial port. All waiting goes through Go's netpoller
// (RawConn): a goroutine blocked in poll(2) would hold the only P of a 1-vCPU guest until sysmon
// takes it back (up to 10 ms later), which made every request that slow.
type portSession struct {
	rc    syscall.RawConn
	fd    int
	buf   []byte
	iov   []syscall.Iovec
	first bool
}

func newPortSession(rc syscall.RawConn, fd int, buf []byte) *portSession {
	s := &portSession{rc: rc, fd: fd, buf: buf, first: true}
	for i := 0; i < portPages; i++ {
		v := syscall.Iovec{Base: &buf[i*4096]}
		v.SetLen(4096)
		s.iov = append(s.iov, v)
	}
	return s
}

func (s *portSession) Name() string { return "virtio-serial" }

// Read takes as many of the port's page buffers as are ready (0 bytes: the host is gone).
func (s *portSession) Read() ([]byte, error) {
	var n uintptr
	var e syscall.Errno
	err := s.rc.Read(func(fd uintptr) bool {
		for {
			n, _, e = syscall.RawSyscall(syscall.SYS_READV, fd, uintptr(unsafe.Pointer(&s.iov[0])), uintptr(len(s.iov)))
			if e != syscall.EINTR {
				return e != syscall.EAGAIN
			}
		}
	})
	if err != nil {
		return nil, err
	}
	if e != 0 {
		return nil, e
	}
	return s.buf[:n], nil
}

// hungUp: the host is not connected (a port without a host polls as hung up). Does not block.
func hungUp(fd int) bool {
	p := pollFd{fd: int32(fd), events: pollOut}
	var zero syscall.Timespec
	_, _, e := syscall.RawSyscall6(syscall.SYS_PPOLL, uintptr(unsafe.Pointer(&p)), 1, uintptr(unsafe.Pointer(&zero)), 0, 0, 0)
	return e == 0 && p.revents&pollHup != 0
}

// Write writes all parts. The session's first write (its HELLO) waits until a host connects; later
// ones fail when the host has gone.
func (s *portSession) Write(parts [][]byte) error {
	first := s.first
	s.first = false
	var werr error
	err := s.rc.Write(func(fd uintptr) bool {
		werr = writeSome(int(fd), &parts)
		if werr != syscall.EAGAIN {
			return true
		}
		if !first && hungUp(int(fd)) {
			werr = errors.New("the host closed the virtio-serial port")
			return true
		}
		return false
	})
	if err != nil {
		return err
	}
	return werr
}

// serveVirtio serves one port forever, one session after another.
func (a *Agent) serveVirtio(dev string) {
	for {
		fd, err := syscall.Open(dev, syscall.O_RDWR|syscall.O_CLOEXEC|syscall.O_NONBLOCK, 0)
		if err != nil {
			logf("virtio-serial port %s failed: %v; retrying", dev, err)
			time.Sleep(500 * time.Millisecond)
			continue
		}
		file := os.NewFile(uintptr(fd), dev) // non-blocking: registered with the netpoller
		rc, err := file.SyscallConn()
		if err != nil {
			logf("virtio-serial port %s: %v", dev, err)
			file.Close()
			time.Sleep(500 * time.Millisecond)
			continue
		}
		var wlock sync.Mutex
		buf := make([]byte, portPages*4096)
		backoff := 50 * time.Millisecond
		for {
			c := newConn(a, newPortSession(rc, fd, buf), &wlock)
			t0 := time.Now()
			got := a.serve(c)
			if got == 0 && time.Since(t0) < 500*time.Millisecond {
				time.Sleep(backoff) // host not really there: do not spin
				backoff *= 2
				if backoff > time.Second {
					backoff = time.Second
				}
			} else {
				backoff = 50 * time.Millisecond
			}
		}
	}
}

// findVirtioPorts maps port names (name, name.N) to their /dev nodes.
func findVirtioPorts(name string) map[string]string {
	found := map[string]string{}
	const sysfs = "/sys/class/virtio-ports"
	entries, err := os.ReadDir(sysfs)
	if err != nil {
		return found
	}
	names := make([]string, 0, len(entries))
	for _, e := range entries {
		names = append(names, e.Name())
	}
	sort.Strings(names)
	for _, port := range names {
		data, err := os.ReadFile(filepath.Join(sysfs, port, "name"))
		if err != nil {
			continue
		}
		got := strings.TrimSpace(string(data))
		suffix := ""
		if strings.HasPrefix(got, name+".") {
			suffix = got[len(name)+1:]
		}
		if _, err := strconv.Atoi(suffix); got == name || (suffix != "" && err == nil && !strings.ContainsAny(suffix, "+-")) {
			found[got] = "/dev/" + port
		}
	}
	return found
}

// streamConn is a socket or stdio transport.
type streamConn struct {
	r    interface{ Read([]byte) (int, error) }
	w    func([][]byte) error
	name string
	buf  []byte
}

func (s *streamConn) Name() string { return s.name }

func (s *streamConn) Read() ([]byte, error) {
	n, err := s.r.Read(s.buf)
	if n > 0 {
		return s.buf[:n], nil
	}
	if err != nil && !errors.Is(err, os.ErrClosed) {
		return nil, nil // EOF or a reset: the session is over
	}
	return nil, err
}

func (s *streamConn) Write(parts [][]byte) error { return s.w(parts) }

func (a *Agent) serveUnix(path string) error {
	os.Remove(path)
	ln, err := net.Listen("unix", path)
	if err != nil {
		return err
	}
	for {
		conn, err := ln.Accept()
		if err != nil {
			logf("accept failed: %v", err)
			time.Sleep(500 * time.Millisecond)
			continue
		}
		go func(conn net.Conn) {
			defer conn.Close()
			t := &streamConn{r: conn, name: "unix", buf: make([]byte, chunkSize), w: func(parts [][]byte) error {
				bufs := net.Buffers(append([][]byte(nil), parts...))
				_, err := bufs.WriteTo(conn)
				return err
			}}
			a.serve(newConn(a, t, &sync.Mutex{}))
		}(conn)
	}
}

func (a *Agent) serveStdio() {
	t := &streamConn{r: os.Stdin, name: "stdio", buf: make([]byte, chunkSize), w: func(parts [][]byte) error {
		_, err := (*net.Buffers)(&parts).WriteTo(os.Stdout)
		return err
	}}
	a.serve(newConn(a, t, &sync.Mutex{}))
}
