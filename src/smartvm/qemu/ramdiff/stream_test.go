package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"math/rand"
	"testing"
)

// stream builds a QEMU 7.2-shaped stream: header, configuration, RAM setup with the given blocks,
// the records (split over a PART and the END section) and device state after them.
type stream struct {
	buf   bytes.Buffer
	last  string
	pages int
}

func (s *stream) u8(v byte)    { s.buf.WriteByte(v) }
func (s *stream) u32(v uint32) { binary.Write(&s.buf, binary.BigEndian, v) }
func (s *stream) u64(v uint64) { binary.Write(&s.buf, binary.BigEndian, v) }
func (s *stream) str(v string) { s.u8(byte(len(v))); s.buf.WriteString(v) }

func (s *stream) header(blocks map[string]int, order []string) {
	s.u32(fileMagic)
	s.u32(fileVersion)
	s.u8(configuration)
	s.u32(7)
	s.buf.WriteString("microvm")
	s.u8(subsection)
	s.str("configuration/capabilities")
	s.u32(1)
	s.u32(1)
	s.str("x-ignore-shared")
	s.u8(sectionStart)
	s.u32(2)
	s.str(ramSection)
	s.u32(0)
	s.u32(4)
	total := 0
	for _, b := range order {
		total += blocks[b]
	}
	s.u64(uint64(total) | flagMemSize)
	for _, b := range order {
		s.str(b)
		s.u64(uint64(blocks[b]))
	}
	s.u64(flagEOS)
	s.footer()
}

func (s *stream) footer() { s.u8(sectionFooter); s.u32(2) }

func (s *stream) section(kind byte) { s.u8(kind); s.u32(2) }

func (s *stream) page(block string, offset int, data []byte) {
	flags := uint64(flagPage)
	if isZero(data) {
		flags = flagZero
	}
	if block == s.last {
		s.u64(uint64(offset) | flags | flagContinue)
	} else {
		s.u64(uint64(offset) | flags)
		s.str(block)
		s.last = block
	}
	if flags == flagZero {
		s.u8(0)
	} else {
		s.buf.Write(data)
	}
	s.pages++
}

func isZero(b []byte) bool { return bytes.Count(b, []byte{0}) == len(b) }

// apply loads a stream's page records into the blocks' memory, as QEMU's RAM load does.
func apply(t *testing.T, data []byte, mem map[string][]byte) []byte {
	t.Helper()
	// walk the stream with the filter's own reader (what it copies is thrown away), loading every record
	f := newFilter(bufio.NewReader(bytes.NewReader(data)), bufio.NewWriter(io.Discard), "", nil)
	if _, err := f.copyU32(); err != nil {
		t.Fatal(err)
	}
	f.copyU32()
	for {
		kind, _ := f.copyU8()
		switch kind {
		case configuration:
			if err := f.copyConfiguration(); err != nil {
				t.Fatal(err)
			}
		case sectionStart:
			f.block, f.base = "ram", mem["ram"] // the setup's own size check, on the test's memory
			if _, err := f.copySetup(); err != nil {
				t.Fatal(err)
			}
		case sectionPart, sectionEnd:
			f.copyU32()
			for {
				h, err := f.readU64()
				if err != nil {
					t.Fatal(err)
				}
				if h&flagMask == flagEOS {
					break
				}
				if h&flagContinue == 0 {
					f.lastIn, _ = f.readString()
				}
				off := h &^ flagMask
				dst := mem[f.lastIn][off : off+pageSize]
				if h&flagZero != 0 {
					fill, _ := f.in.ReadByte()
					for i := range dst {
						dst[i] = fill
					}
				} else {
					io.ReadFull(f.in, dst)
				}
			}
			f.copyFooter()
			if kind == sectionEnd {
				rest, _ := io.ReadAll(f.in)
				return rest
			}
		default:
			t.Fatalf("section %#x", kind)
		}
	}
}

func run(t *testing.T, data []byte, block string, base []byte) ([]byte, *filter, error) {
	t.Helper()
	var out bytes.Buffer
	w := bufio.NewWriter(&out)
	f := newFilter(bufio.NewReader(bytes.NewReader(data)), w, block, base)
	err := f.run()
	w.Flush()
	return out.Bytes(), f, err
}

const device = "\x04\x00\x00\x00\x03device state, copied as it is\x1f"

// A guest whose RAM started as base and then changed some pages: the full stream loaded into zeroed
// memory and the diff loaded over the base give the same memory, and the diff has only the changes.
func TestDiffOverBaseEqualsFullStream(t *testing.T) {
	rng := rand.New(rand.NewSource(7))
	const ramPages, biosPages = 64, 4
	base := make([]byte, ramPages*pageSize)
	for p := 0; p < ramPages; p++ {
		if p%3 != 0 { // every third page of the base is zero
			rng.Read(base[p*pageSize : (p+1)*pageSize])
		}
	}
	guest := append([]byte(nil), base...)
	changed := 0
	for p := 0; p < ramPages; p++ {
		page := guest[p*pageSize : (p+1)*pageSize]
		switch rng.Intn(5) {
		case 0: // new content
			rng.Read(page)
			changed++
		case 1: // zeroed (a zero record where the base page may not be zero)
			if !isZero(page) {
				changed++
			}
			copy(page, make([]byte, pageSize))
		}
	}
	bios := make([]byte, biosPages*pageSize)
	rng.Read(bios)

	var s stream
	s.header(map[string]int{"ram": len(guest), "pc.bios": len(bios)}, []string{"ram", "pc.bios"})
	s.section(sectionPart)
	for p := 0; p < ramPages/2; p++ {
		s.page("ram", p*pageSize, guest[p*pageSize:(p+1)*pageSize])
	}
	s.u64(flagEOS)
	s.footer()
	s.section(sectionEnd)
	for p := ramPages / 2; p < ramPages; p++ {
		s.page("ram", p*pageSize, guest[p*pageSize:(p+1)*pageSize])
		if p == ramPages/2+3 { // another block in between: the ram record after it continues nothing
			for b := 0; b < biosPages; b++ {
				s.page("pc.bios", b*pageSize, bios[b*pageSize:(b+1)*pageSize])
			}
		}
	}
	s.u64(flagEOS)
	s.footer()
	s.buf.WriteString(device)

	diff, f, err := run(t, s.buf.Bytes(), "ram", base)
	if err != nil {
		t.Fatal(err)
	}
	if f.kept != changed || f.kept+f.dropped != ramPages {
		t.Fatalf("kept %d dropped %d, want %d changed of %d", f.kept, f.dropped, changed, ramPages)
	}
	if len(diff) >= s.buf.Len() {
		t.Fatalf("diff %d bytes, full stream %d", len(diff), s.buf.Len())
	}
	full := map[string][]byte{"ram": make([]byte, len(guest)), "pc.bios": make([]byte, len(bios))}
	fromBase := map[string][]byte{"ram": append([]byte(nil), base...), "pc.bios": make([]byte, len(bios))}
	if rest := apply(t, s.buf.Bytes(), full); string(rest) != device {
		t.Fatalf("full stream tail %q", rest)
	}
	if rest := apply(t, diff, fromBase); string(rest) != device {
		t.Fatalf("diff tail %q", rest)
	}
	if !bytes.Equal(full["ram"], guest) || !bytes.Equal(fromBase["ram"], guest) {
		t.Fatal("the diff over the base is not the guest's memory")
	}
	if !bytes.Equal(fromBase["pc.bios"], bios) {
		t.Fatal("another block's pages were not all kept")
	}
}

func TestRefusesWhatItDoesNotKnow(t *testing.T) {
	base := make([]byte, 2*pageSize)
	good := func() *stream {
		var s stream
		s.header(map[string]int{"ram": len(base)}, []string{"ram"})
		s.section(sectionEnd)
		return &s
	}
	cases := map[string]func() []byte{
		"xbzrle page": func() []byte { s := good(); s.u64(0x40); s.str("ram"); return s.buf.Bytes() },
		"truncated":   func() []byte { s := good(); s.u64(flagPage); s.str("ram"); return s.buf.Bytes()[:s.buf.Len()] },
		"outside":     func() []byte { s := good(); s.page("ram", 8*pageSize, make([]byte, pageSize)); return s.buf.Bytes() },
		"other size": func() []byte {
			var s stream
			s.header(map[string]int{"ram": 3 * pageSize}, []string{"ram"})
			return s.buf.Bytes()
		},
		"no block": func() []byte {
			var s stream
			s.header(map[string]int{"mem": len(base)}, []string{"mem"})
			return s.buf.Bytes()
		},
		"not qemu": func() []byte { return []byte("not a stream at all") },
		"device first": func() []byte {
			var s stream
			s.header(map[string]int{"ram": len(base)}, []string{"ram"})
			s.buf.WriteString(device)
			return s.buf.Bytes()
		},
	}
	// a stream this does not understand, or one that does not fit the base file
	format := map[string]bool{"xbzrle page": true, "truncated": true, "not qemu": true, "device first": true}
	for name, make := range cases {
		if _, _, err := run(t, make(), "ram", base); err == nil {
			t.Errorf("%s: accepted", name)
		} else if format[name] != errors.Is(err, errFormat) {
			t.Errorf("%s: %v", name, err)
		}
	}
}
