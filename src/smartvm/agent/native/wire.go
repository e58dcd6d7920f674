// The wire format of docs/agent-protocol.md (the Go twin of src/smartvm/agent/wire.py): the
// 20-byte frame header, the limits, the frame types and error codes, an encoder and an incremental
// decoder that skips oversized frames and resynchronises on the magic after garbage, as wire.py's
// FrameDecoder does. The decoder keeps each frame's raw JSON so the proxy relays it byte for byte.
package main

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"strconv"
)

const (
	agentVersion    = "0.1.0"
	protocolVersion = 1
	virtioPortName  = "smartvm.agent"
	headerSize      = 20
	maxHeaderJSON   = 256 * 1024
	maxPayload      = 1024 * 1024
	chunkSize       = 256 * 1024
	insaneLength    = 64 * 1024 * 1024
)

var magic = []byte("SVMA")

// Frame types.
const (
	fHello   = 1
	fRequest = 2
	fData    = 3
	fEvent   = 4
	fResult  = 5
	fError   = 6
	fCancel  = 7
)

// Error codes carried in ERROR frames.
const (
	eBadMagic   = "bad_magic"
	eBadFrame   = "bad_frame"
	eBadJSON    = "bad_json"
	eTooLarge   = "frame_too_large"
	eVersion    = "unsupported_version"
	eBadRequest = "bad_request"
	eUnknownOp  = "unknown_op"
	eChannel    = "bad_channel"
	eSpawn      = "spawn_failed"
	eCancelled  = "cancelled"
	eInternal   = "internal"
	eNoProcess  = "no_such_process"
)

// Frame is one decoded frame; Raw is its JSON header as sent (nil when empty).
type Frame struct {
	Type    int
	Channel uint32
	Header  map[string]any
	Raw     []byte
	Payload []byte
}

// FrameErr is a framing problem the decoder found; the stream stays usable.
type FrameErr struct {
	Code    string
	Message string
	Channel uint32
}

// encodeHead returns the bytes of a frame before its payload. header is a map, raw JSON bytes, or nil.
func encodeHead(ftype int, channel uint32, header any, payloadLen int) ([]byte, error) {
	out := make([]byte, headerSize, headerSize+64)
	switch h := header.(type) {
	case nil:
	case []byte:
		if !bytes.Equal(h, []byte("{}")) {
			out = append(out, h...)
		}
	case map[string]any:
		if len(h) > 0 {
			var err error
			if out, err = appendJSON(out, h); err != nil { // straight after the fixed part: no copy
				return nil, err
			}
		}
	default:
		return nil, fmt.Errorf("bad header type %T", header)
	}
	headerLen := len(out) - headerSize
	if headerLen > maxHeaderJSON || payloadLen > maxPayload {
		return nil, fmt.Errorf("frame too large: header %d B, payload %d B", headerLen, payloadLen)
	}
	copy(out, magic)
	out[4] = protocolVersion
	out[5] = byte(ftype)
	binary.BigEndian.PutUint32(out[8:], channel)
	binary.BigEndian.PutUint32(out[12:], uint32(headerLen))
	binary.BigEndian.PutUint32(out[16:], uint32(payloadLen))
	return out, nil
}

// marshal is json.Marshal without HTML escaping (Python's json.dumps does not escape <, > and &).
func marshal(v any) ([]byte, error) { return appendJSON(nil, v) }

// Decoder is the incremental frame decoder: Feed bytes, get frames and framing errors.
//
// A frame's Payload is not copied: it points into the decoder's buffer or into the data passed to
// Feed, and is valid only until the next Feed (a consumer that keeps it copies it). Relaying 10 MiB
// through the proxy copied every byte three times before (append, payload, compaction), which
// under TCG was most of a relayed file transfer's cost.
type Decoder struct {
	buf       []byte
	off       int // start of the unparsed bytes in buf
	skip      int
	resyncing bool
}

// Feed parses data (with what an earlier Feed left) and returns every complete frame (*Frame) or
// problem (*FrameErr) in order.
func (d *Decoder) Feed(data []byte) []any {
	if d.off >= len(d.buf) {
		d.buf, d.off = d.buf[:0], 0
	}
	direct := len(d.buf) == 0 // nothing left over: parse the caller's bytes where they are
	var buf []byte
	pos := 0
	if direct {
		buf = data
	} else {
		if d.off > 0 { // earlier frames' payloads are no longer in use: compact now
			d.buf = append(d.buf[:0], d.buf[d.off:]...)
			d.off = 0
		}
		d.buf = append(d.buf, data...)
		buf = d.buf
	}
	var out []any
	end := len(buf)
	for {
		if d.skip > 0 {
			n := d.skip
			if end-pos < n {
				n = end - pos
			}
			pos += n
			d.skip -= n
			if d.skip > 0 {
				break
			}
		}
		avail := end - pos
		if avail < headerSize && (!d.resyncing || avail < len(magic)) {
			break
		}
		if !bytes.Equal(buf[pos:pos+4], magic) {
			d.garbage(&out, "bytes that do not start a frame (bad magic)", eBadMagic)
			idx := bytes.Index(buf[pos+1:end], magic)
			if idx < 0 {
				if p := end - (len(magic) - 1); p > pos {
					pos = p
				}
				break
			}
			pos += 1 + idx
			continue
		}
		if avail < headerSize {
			break
		}
		ver, ftype := buf[pos+4], buf[pos+5]
		channel := binary.BigEndian.Uint32(buf[pos+8:])
		hlen := int(binary.BigEndian.Uint32(buf[pos+12:]))
		plen := int(binary.BigEndian.Uint32(buf[pos+16:]))
		if hlen > insaneLength || plen > insaneLength || ftype == 0 {
			d.garbage(&out, fmt.Sprintf("corrupt frame header (lengths %d/%d)", hlen, plen), eBadFrame)
			pos++
			continue
		}
		d.resyncing = false
		total := headerSize + hlen + plen
		if ver != protocolVersion {
			out = append(out, &FrameErr{eVersion, fmt.Sprintf(
				"protocol version %d is not supported (this side speaks %d)", ver, protocolVersion), channel})
			d.skip = total
			continue
		}
		if hlen > maxHeaderJSON || plen > maxPayload {
			out = append(out, &FrameErr{eTooLarge, fmt.Sprintf(
				"frame of %d B header + %d B payload exceeds the limits (%d B / %d B)",
				hlen, plen, maxHeaderJSON, maxPayload), channel})
			d.skip = total
			continue
		}
		if avail < total {
			break
		}
		start := pos + headerSize
		f := &Frame{Type: int(ftype), Channel: channel, Header: map[string]any{}}
		if hlen > 0 {
			f.Raw = append([]byte(nil), buf[start:start+hlen]...)
		}
		f.Payload = buf[start+hlen : pos+total]
		pos += total
		if f.Raw != nil {
			var v any
			dec := json.NewDecoder(bytes.NewReader(f.Raw))
			dec.UseNumber()
			if err := dec.Decode(&v); err != nil || dec.More() {
				out = append(out, &FrameErr{eBadJSON, fmt.Sprintf("frame header is not valid JSON: %v", err), channel})
				continue
			}
			m, ok := v.(map[string]any)
			if !ok {
				out = append(out, &FrameErr{eBadJSON, "frame header must be a JSON object", channel})
				continue
			}
			f.Header = m
		}
		out = append(out, f)
	}
	if direct {
		d.buf = append(d.buf[:0], buf[pos:]...) // a partial frame waits for more bytes
		d.off = 0
	} else {
		d.off = pos
	}
	return out
}

func (d *Decoder) garbage(out *[]any, message, code string) {
	if !d.resyncing {
		*out = append(*out, &FrameErr{code, message + "; resynchronising", 0})
		d.resyncing = true
	}
}

// pyFloat is a float that stays a float in JSON when it is integral (0.0, not 0), as Python's
// json writes it: the host's types do not change with the value.
type pyFloat float64

func (f pyFloat) MarshalJSON() ([]byte, error) { return f.appendTo(nil), nil }

func (f pyFloat) appendTo(b []byte) []byte {
	start := len(b)
	b = strconv.AppendFloat(b, float64(f), 'g', -1, 64)
	if !bytes.ContainsAny(b[start:], ".eEnN") {
		b = append(b, '.', '0')
	}
	return b
}
