package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

// QEMU 7.2 stream constants (migration/savevm.c, migration/ram.c).
const (
	fileMagic   = 0x5145564d // "QEVM"
	fileVersion = 3

	sectionStart  = 0x01
	sectionPart   = 0x02
	sectionEnd    = 0x03
	subsection    = 0x05
	configuration = 0x07
	sectionFooter = 0x7e

	flagZero     = 0x02
	flagMemSize  = 0x04
	flagPage     = 0x08
	flagEOS      = 0x10
	flagContinue = 0x20
	flagMask     = 0xfff // the flags live in the low bits of a page-aligned offset

	pageSize   = 4096
	ramSection = "ram"
)

var errFormat = errors.New("unsupported migration stream")

type filter struct {
	in      *bufio.Reader
	out     *bufio.Writer
	block   string
	base    []byte
	zero    []byte
	page    []byte
	lastIn  string // the block of the last page record read (records may say "same block")
	lastOut string // the block of the last page record written
	changed []bool // per page of the block: may differ from the base (nil: compare every page)
	kept    int
	dropped int
}

func newFilter(in *bufio.Reader, out *bufio.Writer, block string, base []byte) *filter {
	return &filter{in: in, out: out, block: block, base: base, zero: make([]byte, pageSize), page: make([]byte, pageSize)}
}

// run copies the header, the configuration and the RAM sections (filtered), then the rest (device
// state) unchanged. RAM comes before any device state: QEMU completes the iterable sections first.
func (f *filter) run() error {
	magic, err := f.copyU32()
	if err != nil {
		return err
	}
	version, err := f.copyU32()
	if err != nil {
		return err
	}
	if magic != fileMagic || version != fileVersion {
		return fmt.Errorf("%w: header %#x version %d", errFormat, magic, version)
	}
	ramID := uint32(0)
	started := false
	for {
		kind, err := f.copyU8()
		if err != nil {
			return err
		}
		switch kind {
		case configuration:
			if err := f.copyConfiguration(); err != nil {
				return err
			}
		case sectionStart:
			if started {
				return fmt.Errorf("%w: a second iterable section", errFormat)
			}
			if ramID, err = f.copySetup(); err != nil {
				return err
			}
			started = true
		case sectionPart, sectionEnd:
			id, err := f.copyU32()
			if err != nil {
				return err
			}
			if !started || id != ramID {
				return fmt.Errorf("%w: section %d is not RAM", errFormat, id)
			}
			if err := f.pages(); err != nil {
				return err
			}
			if err := f.copyFooter(); err != nil {
				return err
			}
			if kind == sectionEnd {
				_, err := io.Copy(f.out, f.in)
				return err
			}
		default:
			return fmt.Errorf("%w: section type %#x before the end of RAM", errFormat, kind)
		}
	}
}

// copyConfiguration copies the machine name and the subsections QEMU 7.2 may add.
func (f *filter) copyConfiguration() error {
	if err := f.copyBytesU32(); err != nil {
		return err
	}
	for {
		next, err := f.in.Peek(1)
		if err != nil {
			return eof(err)
		}
		if next[0] != subsection {
			return nil
		}
		if _, err := f.copyU8(); err != nil {
			return err
		}
		name, err := f.copyString()
		if err != nil {
			return err
		}
		if _, err := f.copyU32(); err != nil { // its version
			return err
		}
		switch name {
		case "configuration/target-page-bits":
			_, err = f.copyU32()
		case "configuration/capabilities":
			var count uint32
			if count, err = f.copyU32(); err == nil {
				for i := uint32(0); i < count && err == nil; i++ {
					_, err = f.copyString()
				}
			}
		case "configuration/uuid":
			err = f.copyN(16)
		default:
			return fmt.Errorf("%w: configuration subsection %q", errFormat, name)
		}
		if err != nil {
			return err
		}
	}
}

// copySetup copies the RAM section's start (the block list) and checks the base file's size.
func (f *filter) copySetup() (uint32, error) {
	id, err := f.copyU32()
	if err != nil {
		return 0, err
	}
	name, err := f.copyString()
	if err != nil {
		return 0, err
	}
	if name != ramSection {
		return 0, fmt.Errorf("%w: iterable section %q", errFormat, name)
	}
	if err := f.copyN(8); err != nil { // instance and version
		return 0, err
	}
	total, err := f.copyU64()
	if err != nil {
		return 0, err
	}
	if total&flagMemSize == 0 {
		return 0, fmt.Errorf("%w: RAM setup without the memory size", errFormat)
	}
	total &^= flagMask
	found := false
	for total > 0 {
		block, err := f.copyString()
		if err != nil {
			return 0, err
		}
		used, err := f.copyU64()
		if err != nil {
			return 0, err
		}
		if used > total {
			return 0, fmt.Errorf("%w: RAM block sizes exceed the total", errFormat)
		}
		total -= used
		if block == f.block {
			if used != uint64(len(f.base)) {
				return 0, fmt.Errorf("block %s has %d bytes, the base file %d", block, used, len(f.base))
			}
			found = true
		}
	}
	if !found {
		return 0, fmt.Errorf("the stream has no RAM block %s", f.block)
	}
	eos, err := f.copyU64()
	if err != nil {
		return 0, err
	}
	if eos != flagEOS {
		return 0, fmt.Errorf("%w: RAM setup ends with %#x", errFormat, eos)
	}
	return id, f.copyFooter()
}

// pages filters the page records of one RAM section up to its end-of-section mark.
func (f *filter) pages() error {
	for {
		header, err := f.readU64()
		if err != nil {
			return err
		}
		flags := header & flagMask
		offset := header &^ flagMask
		if flags == flagEOS {
			return f.putU64(header)
		}
		if flags&^(flagZero|flagPage|flagContinue) != 0 || flags&(flagZero|flagPage) == 0 ||
			flags&(flagZero|flagPage) == flagZero|flagPage {
			return fmt.Errorf("%w: page flags %#x", errFormat, flags)
		}
		if flags&flagContinue == 0 {
			if f.lastIn, err = f.readString(); err != nil {
				return err
			}
		} else if f.lastIn == "" {
			return fmt.Errorf("%w: a page continues no block", errFormat)
		}
		var fill byte
		if flags&flagZero != 0 {
			if fill, err = f.in.ReadByte(); err != nil {
				return eof(err)
			}
		} else if _, err := io.ReadFull(f.in, f.page); err != nil {
			return eof(err)
		}
		if f.lastIn == f.block {
			if uint64(len(f.base)) < pageSize || offset > uint64(len(f.base))-pageSize {
				return fmt.Errorf("page at %#x is outside block %s", offset, f.block)
			}
			written := f.changed == nil || f.changed[offset/pageSize]
			if !written || f.unchanged(f.base[offset:offset+pageSize], flags, fill) {
				f.dropped++
				continue
			}
			f.kept++
		}
		if err := f.putRecord(header&^flagContinue, flags, fill); err != nil {
			return err
		}
	}
}

func (f *filter) unchanged(base []byte, flags uint64, fill byte) bool {
	if flags&flagPage != 0 {
		return bytes.Equal(base, f.page)
	}
	if fill == 0 {
		return bytes.Equal(base, f.zero)
	}
	for _, b := range base {
		if b != fill {
			return false
		}
	}
	return true
}

// putRecord writes a page record, naming its block again when the last one written was another
// (the record that named it may have been left out).
func (f *filter) putRecord(header, flags uint64, fill byte) error {
	if f.lastOut == f.lastIn {
		header |= flagContinue
	}
	if err := f.putU64(header); err != nil {
		return err
	}
	if f.lastOut != f.lastIn {
		f.out.WriteByte(byte(len(f.lastIn)))
		f.out.WriteString(f.lastIn)
		f.lastOut = f.lastIn
	}
	if flags&flagZero != 0 {
		return f.out.WriteByte(fill)
	}
	_, err := f.out.Write(f.page)
	return err
}

func (f *filter) copyFooter() error {
	next, err := f.in.Peek(1)
	if err != nil {
		return eof(err)
	}
	if next[0] == sectionFooter {
		return f.copyN(5)
	}
	return nil
}

// --- reading and copying -------------------------------------------------------------------------

func eof(err error) error {
	if err == io.EOF {
		return fmt.Errorf("%w: the stream ends early", errFormat)
	}
	return err
}

func (f *filter) copyN(n int) error {
	_, err := io.CopyN(f.out, f.in, int64(n))
	return eof(err)
}

func (f *filter) copyU8() (byte, error) {
	b, err := f.in.ReadByte()
	if err != nil {
		return 0, eof(err)
	}
	return b, f.out.WriteByte(b)
}

func (f *filter) copyU32() (uint32, error) {
	var b [4]byte
	if _, err := io.ReadFull(f.in, b[:]); err != nil {
		return 0, eof(err)
	}
	_, err := f.out.Write(b[:])
	return binary.BigEndian.Uint32(b[:]), err
}

func (f *filter) copyU64() (uint64, error) {
	v, err := f.readU64()
	if err != nil {
		return 0, err
	}
	return v, f.putU64(v)
}

func (f *filter) readU64() (uint64, error) {
	var b [8]byte
	if _, err := io.ReadFull(f.in, b[:]); err != nil {
		return 0, eof(err)
	}
	return binary.BigEndian.Uint64(b[:]), nil
}

func (f *filter) putU64(v uint64) error {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	_, err := f.out.Write(b[:])
	return err
}

// readString reads a QEMU idstr: one length byte and that many bytes.
func (f *filter) readString() (string, error) {
	n, err := f.in.ReadByte()
	if err != nil {
		return "", eof(err)
	}
	b := make([]byte, n)
	if _, err := io.ReadFull(f.in, b); err != nil {
		return "", eof(err)
	}
	return string(b), nil
}

func (f *filter) copyString() (string, error) {
	s, err := f.readString()
	if err != nil {
		return "", err
	}
	f.out.WriteByte(byte(len(s)))
	_, err = f.out.WriteString(s)
	return s, err
}

// copyBytesU32 copies a buffer with a 32-bit length in front.
func (f *filter) copyBytesU32() error {
	n, err := f.copyU32()
	if err != nil {
		return err
	}
	return f.copyN(int(n))
}
