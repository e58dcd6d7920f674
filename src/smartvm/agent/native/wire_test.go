// Tests of the frame codec: round trips, split input, oversized frames skipped, garbage resynced.
package main

import (
	"bytes"
	"testing"
)

func frame(t *testing.T, ftype int, ch uint32, hdr map[string]any, payload []byte) []byte {
	t.Helper()
	head, err := encodeHead(ftype, ch, hdr, len(payload))
	if err != nil {
		t.Fatal(err)
	}
	return append(head, payload...)
}

func TestRoundTripByteByByte(t *testing.T) {
	data := append(frame(t, fRequest, 7, map[string]any{"op": "ping"}, nil),
		frame(t, fData, 7, map[string]any{"s": "stdin"}, []byte("abc"))...)
	var d Decoder
	var got []any
	for i := range data {
		got = append(got, d.Feed(data[i:i+1])...)
	}
	if len(got) != 2 {
		t.Fatalf("got %d items", len(got))
	}
	f := got[1].(*Frame)
	if f.Type != fData || f.Channel != 7 || !bytes.Equal(f.Payload, []byte("abc")) || f.Header["s"] != "stdin" {
		t.Fatalf("bad frame %+v", f)
	}
	if string(got[0].(*Frame).Raw) != `{"op":"ping"}` {
		t.Fatalf("raw header %q", got[0].(*Frame).Raw)
	}
}

func TestGarbageResync(t *testing.T) {
	var d Decoder
	data := append([]byte("garbage!!"), frame(t, fHello, 0, nil, nil)...)
	got := d.Feed(data)
	if len(got) != 2 || got[0].(*FrameErr).Code != eBadMagic || got[1].(*Frame).Type != fHello {
		t.Fatalf("got %#v", got)
	}
}

func TestOversizedSkipped(t *testing.T) {
	var d Decoder
	head := make([]byte, headerSize)
	copy(head, magic)
	head[4], head[5] = protocolVersion, fData
	head[19] = 0
	head[16], head[17] = 0, 0x20 // payload 2 MiB > maxPayload
	data := append(head, make([]byte, 2*1024*1024)...)
	data = append(data, frame(t, fCancel, 3, nil, nil)...)
	got := d.Feed(data)
	if len(got) != 2 || got[0].(*FrameErr).Code != eTooLarge || got[1].(*Frame).Type != fCancel {
		t.Fatalf("got %#v", got)
	}
}

func TestBadJSON(t *testing.T) {
	var d Decoder
	head, _ := encodeHead(fRequest, 5, []byte("[1]"), 0)
	got := d.Feed(head)
	if len(got) != 1 || got[0].(*FrameErr).Code != eBadJSON || got[0].(*FrameErr).Channel != 5 {
		t.Fatalf("got %#v", got)
	}
}

func TestPyFloatStaysAFloat(t *testing.T) {
	for in, want := range map[float64]string{0: "0.0", 3: "3.0", 1.5: "1.5", 1e16: "1e+16", -2: "-2.0"} {
		got, err := marshal(map[string]any{"v": pyFloat(in)})
		if err != nil || string(got) != `{"v":`+want+`}` {
			t.Errorf("%v: got %s (%v), want %s", in, got, err, want)
		}
	}
}
