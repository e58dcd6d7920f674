// Tests of a channel's end: DATA the host sent before it saw the answer is dropped, not answered.
package main

import (
	"sync"
	"testing"
)

// recordingTransport decodes and keeps every frame written.
type recordingTransport struct {
	frames  []*Frame
	decoder Decoder
}

func (t *recordingTransport) Read() ([]byte, error) { select {} }
func (t *recordingTransport) Name() string          { return "test" }
func (t *recordingTransport) Write(parts [][]byte) error {
	var buf []byte
	for _, p := range parts {
		buf = append(buf, p...)
	}
	for _, item := range t.decoder.Feed(buf) {
		t.frames = append(t.frames, item.(*Frame))
	}
	return nil
}

func session() (*Agent, *Conn, *recordingTransport) {
	rt := &recordingTransport{}
	a := newAgent(true, newProxy("python3", "/nonexistent/agent.py", nil)) // never started here
	return a, newConn(a, rt, &sync.Mutex{}), rt
}

func dataFrame(channel uint32) *Frame {
	return &Frame{Type: fData, Channel: channel, Header: map[string]any{"s": "file"}, Payload: []byte("x")}
}

func TestDataAfterTheAnswerIsDropped(t *testing.T) {
	a, c, rt := session()
	ch := newChannel(c, 7)
	c.chans[7] = ch
	ch.fail(eBadRequest, "no")
	a.dispatch(c, dataFrame(7))
	if len(rt.frames) != 1 || rt.frames[0].Type != fError || rt.frames[0].Header["code"] != eBadRequest {
		t.Fatalf("want only the answer, got %d frames: %v", len(rt.frames), rt.frames)
	}
}

func TestDataForAChannelNeverOpenedIsAnError(t *testing.T) {
	a, c, rt := session()
	for _, id := range []uint32{0, 8} {
		a.dispatch(c, dataFrame(id))
	}
	if len(rt.frames) != 2 || rt.frames[0].Header["code"] != eChannel || rt.frames[1].Header["code"] != eChannel {
		t.Fatalf("want two bad_channel errors, got %v", rt.frames)
	}
}

func TestOnlyTheLastAnswersAreRemembered(t *testing.T) {
	a, c, rt := session()
	for id := uint32(1); id <= answeredKept+1; id++ {
		ch := newChannel(c, id)
		c.chans[id] = ch
		ch.result(map[string]any{})
	}
	rt.frames = nil
	a.dispatch(c, dataFrame(1))            // answered longest ago: forgotten
	a.dispatch(c, dataFrame(answeredKept)) // recent: dropped
	if len(rt.frames) != 1 || rt.frames[0].Channel != 1 || rt.frames[0].Header["code"] != eChannel {
		t.Fatalf("want one bad_channel error for channel 1, got %v", rt.frames)
	}
}

func TestDataQueuedOnAFinishedChannelIsDropped(t *testing.T) {
	_, c, _ := session()
	ch := newChannel(c, 7)
	ch.closed = true
	if !ch.push(map[string]any{"s": "file"}, []byte("late")) || len(ch.inbox) != 0 {
		t.Fatal("late DATA was queued on a finished channel")
	}
}
