// One host connection (a session on a virtio-serial port, or one socket client) and the channels
// opened on it: the read loop, request dispatch, the held "started" event and cancellation. The same
// rules as guest.py's Conn/Channel/Agent.serve/Agent.dispatch, so the host sees the same frames.
package main

import (
	"fmt"
	"log"
	"strings"
	"sync"
	"time"
)

const stdinQueueLimit = 64 * 1024 * 1024

// Transport is a byte stream: Read returns 0 bytes at EOF; Write writes all parts in order.
type Transport interface {
	Read() ([]byte, error)
	Write(parts [][]byte) error
	Name() string
}

// Conn is one session: its stream, its write lock (shared by the sessions of one port) and channels.
type Conn struct {
	t     Transport
	wlock *sync.Mutex
	mu    sync.Mutex
	alive bool
	chans map[uint32]*Channel
	// answered holds the ids of the last requests answered on this session: the host streams a
	// request's DATA without waiting, so frames for it may still arrive after its answer (a write
	// that failed at once). Those are dropped, not each answered with a bad_channel error.
	answered [answeredKept]uint32
	nextSlot int
	agent    *Agent
	closed   chan struct{}
}

const answeredKept = 64

// wasAnswered tells whether channel id belongs to a recently answered request (c.mu held).
func (c *Conn) wasAnswered(id uint32) bool {
	if id == 0 { // never a request's id (and what the empty slots hold)
		return false
	}
	for _, old := range c.answered {
		if old == id {
			return true
		}
	}
	return false
}

func newConn(a *Agent, t Transport, wlock *sync.Mutex) *Conn {
	return &Conn{t: t, wlock: wlock, alive: true, chans: map[uint32]*Channel{}, agent: a, closed: make(chan struct{})}
}

type outFrame struct {
	ftype   int
	header  any
	payload []byte
}

// sendFrames writes frames of one channel in one write; false if the session is over.
func (c *Conn) sendFrames(ch uint32, frames []outFrame) bool {
	parts := make([][]byte, 0, 2*len(frames))
	for _, f := range frames {
		head, err := encodeHead(f.ftype, ch, f.header, len(f.payload))
		if err != nil {
			log.Printf("cannot encode a frame: %v", err)
			return false
		}
		parts = append(parts, head)
		if len(f.payload) > 0 {
			parts = append(parts, f.payload)
		}
	}
	c.wlock.Lock()
	defer c.wlock.Unlock()
	c.mu.Lock()
	alive := c.alive
	c.mu.Unlock()
	if !alive {
		return false
	}
	if err := c.t.Write(parts); err != nil {
		c.mu.Lock()
		c.alive = false
		c.mu.Unlock()
		return false
	}
	return true
}

func (c *Conn) send(ftype int, ch uint32, header any, payload []byte) bool {
	return c.sendFrames(ch, []outFrame{{ftype, header, payload}})
}

func (c *Conn) errorFrame(ch uint32, code, message string) {
	c.send(fError, ch, map[string]any{"code": code, "message": message}, nil)
}

func (c *Conn) isAlive() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.alive
}

// Channel is a native request in flight: its inbox of DATA frames, held frames and cancel hooks.
type Channel struct {
	conn      *Conn
	id        uint32
	mu        sync.Mutex
	held      []outFrame
	closed    bool
	cancelled bool
	hooks     []func()
	inbox     []inItem
	inboxSize int
	inboxCond *sync.Cond
	done      bool // finished: no more inbox items will be taken
}

type inItem struct {
	header  map[string]any
	payload []byte
}

func newChannel(c *Conn, id uint32) *Channel {
	ch := &Channel{conn: c, id: id}
	ch.inboxCond = sync.NewCond(&ch.mu)
	return ch
}

// onCancel runs fn when the channel is cancelled (at once if it already is).
func (ch *Channel) onCancel(fn func()) {
	ch.mu.Lock()
	if ch.cancelled {
		ch.mu.Unlock()
		fn()
		return
	}
	ch.hooks = append(ch.hooks, fn)
	ch.mu.Unlock()
}

func (ch *Channel) cancel() {
	ch.mu.Lock()
	if ch.cancelled {
		ch.mu.Unlock()
		return
	}
	ch.cancelled = true
	hooks := ch.hooks
	ch.hooks = nil
	ch.inboxCond.Broadcast()
	ch.mu.Unlock()
	for _, fn := range hooks {
		fn()
	}
}

func (ch *Channel) isCancelled() bool {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	return ch.cancelled
}

// sendNow sends frames, the held ones first.
func (ch *Channel) sendNow(frames ...outFrame) {
	ch.mu.Lock()
	all := append(ch.held, frames...)
	ch.held = nil
	ch.mu.Unlock()
	if len(all) == 0 {
		return
	}
	ch.conn.sendFrames(ch.id, all)
}

// holdEvent queues an EVENT to go out with the channel's next frame (or at flush).
func (ch *Channel) holdEvent(header map[string]any) {
	ch.mu.Lock()
	ch.held = append(ch.held, outFrame{fEvent, header, nil})
	ch.mu.Unlock()
}

func (ch *Channel) flush() { ch.sendNow() }

// data sends DATA frames of at most chunkSize bytes each.
func (ch *Channel) data(stream string, payload []byte, eof bool) {
	last := 0
	if len(payload) > 0 {
		last = (len(payload) - 1) / chunkSize * chunkSize
	}
	for i := 0; i <= last; i += chunkSize {
		hdr := map[string]any{"s": stream}
		if eof && i == last {
			hdr["eof"] = true
		}
		end := i + chunkSize
		if end > len(payload) {
			end = len(payload)
		}
		ch.sendNow(outFrame{fData, hdr, payload[i:end]})
	}
}

// sendData is data without an EOF mark: an emitter of command output.
func (ch *Channel) sendData(stream string, payload []byte) { ch.data(stream, payload, false) }

func (ch *Channel) result(header map[string]any) { ch.finish(fResult, header) }

func (ch *Channel) fail(code, message string) {
	ch.finish(fError, map[string]any{"code": code, "message": message})
}

func (ch *Channel) finish(ftype int, header map[string]any) {
	ch.mu.Lock()
	if ch.closed {
		ch.mu.Unlock()
		return
	}
	ch.closed = true
	ch.done = true
	ch.inboxCond.Broadcast()
	ch.mu.Unlock()
	c := ch.conn
	c.mu.Lock()
	if c.chans[ch.id] == ch {
		delete(c.chans, ch.id)
		c.answered[c.nextSlot] = ch.id
		c.nextSlot = (c.nextSlot + 1) % answeredKept
	}
	c.mu.Unlock()
	body, err := marshal(header)
	if err != nil {
		body = []byte(fmt.Sprintf(`{"code":"internal","message":%q}`, err.Error()))
		ftype = fError
	}
	if len(body) > maxHeaderJSON {
		for i := 0; i < len(body); i += chunkSize {
			end := i + chunkSize
			if end > len(body) {
				end = len(body)
			}
			ch.sendNow(outFrame{fData, map[string]any{"s": "result"}, body[i:end]})
		}
		body = []byte(`{"result_in_data":true}`)
	}
	ch.mu.Lock()
	all := append(ch.held, outFrame{ftype, body, nil})
	ch.held = nil
	ch.mu.Unlock()
	c.sendFrames(ch.id, all)
}

// push queues a DATA frame from the host; false if the inbox limit is exceeded.
func (ch *Channel) push(header map[string]any, payload []byte) bool {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	if ch.closed {
		return true // answered: nothing reads the inbox any more
	}
	if ch.inboxSize+len(payload) > stdinQueueLimit {
		return false
	}
	ch.inboxSize += len(payload)
	ch.inbox = append(ch.inbox, inItem{header, payload})
	ch.inboxCond.Signal()
	return true
}

// nextData blocks for the next DATA frame; ok is false once the channel is cancelled or finished.
func (ch *Channel) nextData() (inItem, bool) {
	ch.mu.Lock()
	defer ch.mu.Unlock()
	for len(ch.inbox) == 0 && !ch.cancelled && !ch.done {
		ch.inboxCond.Wait()
	}
	if ch.cancelled || ch.done {
		return inItem{}, false
	}
	it := ch.inbox[0]
	ch.inbox = ch.inbox[1:]
	ch.inboxSize -= len(it.payload)
	return it, true
}

// opError is a failed request: an ERROR frame with this code and message.
type opError struct{ code, message string }

func (e *opError) Error() string { return e.message }

func badRequest(format string, args ...any) *opError {
	return &opError{eBadRequest, fmt.Sprintf(format, args...)}
}

// serve runs one session until EOF; returns the number of bytes read.
func (a *Agent) serve(c *Conn) int {
	var dec Decoder
	total := 0
	defer func() {
		c.mu.Lock()
		c.alive = false
		chans := c.chans
		c.chans = map[uint32]*Channel{}
		c.mu.Unlock()
		for _, ch := range chans {
			ch.cancel()
		}
		a.proxy.dropConn(c)
		close(c.closed)
	}()
	a.proxy.waitReady()
	if !c.send(fHello, 0, a.hello(c), nil) {
		return 0
	}
	for {
		data, err := c.t.Read()
		if err != nil || len(data) == 0 || !c.isAlive() {
			return total
		}
		total += len(data)
		for _, item := range dec.Feed(data) {
			a.dispatch(c, item)
		}
	}
}

func (a *Agent) dispatch(c *Conn, item any) {
	if fe, ok := item.(*FrameErr); ok {
		c.errorFrame(fe.Channel, fe.Code, fe.Message)
		c.mu.Lock()
		ch := c.chans[fe.Channel]
		c.mu.Unlock()
		if ch != nil {
			ch.cancel()
			ch.fail(fe.Code, fe.Message)
		} else if a.proxy.abandon(c, fe.Channel) {
			c.errorFrame(fe.Channel, fe.Code, fe.Message)
		}
		return
	}
	f := item.(*Frame)
	switch f.Type {
	case fHello:
		// A host HELLO starts a new session on this stream: cancel what the previous host left.
		c.mu.Lock()
		stale := c.chans
		c.chans = map[uint32]*Channel{}
		c.mu.Unlock()
		for _, ch := range stale {
			ch.mu.Lock()
			ch.closed = true
			ch.mu.Unlock()
			ch.cancel()
		}
		a.proxy.dropConn(c)
		c.send(fHello, 0, a.hello(c), nil)
	case fRequest:
		op, _ := f.Header["op"].(string)
		if f.Channel == 0 {
			c.errorFrame(0, eChannel, "requests need a channel id > 0")
			return
		}
		handler, native := a.handlers[op]
		if !native && !proxiedOps[op] {
			c.errorFrame(f.Channel, eUnknownOp, fmt.Sprintf("unknown op %s; known ops: %s",
				pyRepr(f.Header["op"]), strings.Join(a.ops(), ", ")))
			return
		}
		c.mu.Lock()
		_, busy := c.chans[f.Channel]
		c.mu.Unlock()
		if busy || a.proxy.has(c, f.Channel) {
			c.errorFrame(f.Channel, eChannel, fmt.Sprintf("channel %d is already in use", f.Channel))
			return
		}
		if !native {
			a.proxy.request(c, f)
			return
		}
		ch := newChannel(c, f.Channel)
		c.mu.Lock()
		c.chans[f.Channel] = ch
		c.mu.Unlock()
		f.Payload = append([]byte(nil), f.Payload...) // the decoder's buffer is reused
		go a.run(handler, ch, f)
	case fData, fCancel:
		c.mu.Lock()
		ch := c.chans[f.Channel]
		late := ch == nil && c.wasAnswered(f.Channel)
		c.mu.Unlock()
		if ch == nil {
			if a.proxy.forward(c, f) || late {
				return
			}
			if f.Type == fData {
				c.errorFrame(f.Channel, eChannel, fmt.Sprintf("no open request on channel %d", f.Channel))
			}
			return
		}
		if f.Type == fCancel {
			ch.cancel()
		} else if !ch.push(f.Header, append([]byte(nil), f.Payload...)) {
			ch.cancel()
			ch.fail(eBadRequest, "too much data queued on this channel; send less at once")
		}
	default:
		c.errorFrame(f.Channel, eBadFrame, fmt.Sprintf("frame type %d is not accepted by the agent", f.Type))
	}
}

type handler func(ch *Channel, req map[string]any, payload []byte) error

func (a *Agent) run(h handler, ch *Channel, f *Frame) {
	op, _ := f.Header["op"].(string)
	defer func() {
		if r := recover(); r != nil {
			log.Printf("op %s crashed: %v", op, r)
			ch.fail(eInternal, fmt.Sprintf("agent error in %s: %v", op, r))
		}
		ch.mu.Lock()
		closed := ch.closed
		ch.mu.Unlock()
		if !closed {
			ch.fail(eInternal, fmt.Sprintf("op %s ended without a result", op))
		}
	}()
	if err := h(ch, f.Header, f.Payload); err != nil {
		if oe, ok := err.(*opError); ok {
			ch.fail(oe.code, oe.message)
		} else if fe, ok := err.(*fileError); ok {
			ch.finish(fError, map[string]any{"code": fe.code, "message": fe.message, "errno": fe.errno})
		} else {
			ch.fail(eInternal, fmt.Sprintf("agent error in %s: %v", op, err))
		}
	}
}

// ops is every op the host can ask for: the native ones and the proxied ones (HELLO "ops").
func (a *Agent) ops() []string { return a.opNames }

// pyRepr renders a JSON value roughly as Python's repr would in an error message.
func pyRepr(v any) string {
	switch x := v.(type) {
	case nil:
		return "None"
	case string:
		if strings.Contains(x, "'") && !strings.Contains(x, `"`) {
			return `"` + x + `"`
		}
		return "'" + strings.ReplaceAll(strings.ReplaceAll(x, `\`, `\\`), "'", `\'`) + "'"
	case bool:
		if x {
			return "True"
		}
		return "False"
	default:
		return fmt.Sprint(x)
	}
}

var monoStart = time.Now()

// mono is monotonic seconds (for durations).
func mono() float64 { return time.Since(monoStart).Seconds() }

// now is the wall clock in epoch seconds.
func now() float64 { return float64(time.Now().UnixNano()) / 1e9 }
