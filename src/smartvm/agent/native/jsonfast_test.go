package main

import (
	"bytes"
	"encoding/json"
	"math"
	"testing"
)

func referenceJSON(t *testing.T, v any) string {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		t.Fatalf("reference: %v", err)
	}
	return string(bytes.TrimRight(buf.Bytes(), "\n"))
}

func TestAppendJSONWritesWhatEncodingJSONWrites(t *testing.T) {
	values := []any{
		nil, true, false, "", "plain", `q"uo\te`, "line\nbreak\r\ttab\x00\x1f\x7f", "<a>&</a>",
		"üñí €", "bad \xff utf8 \xc3", "sep \u2028 \u2029", 0, -7, int64(1) << 60, uint32(4000000000),
		0.0, 1.5, -0.25, 1e-7, 1e21, 1e20, 123456789.125, 1.7e308, 5e-324, json.Number("12"),
		json.Number("-1.5e3"), []string{"a", "b\n"}, []any{}, map[string]any{},
		map[string]any{"z": 1, "a": []any{1.5, "x", nil, map[string]any{"k": false}}, "m": "é"},
		struct{ A int }{3},
	}
	for _, v := range values {
		got, err := appendJSON(nil, v)
		if err != nil {
			t.Errorf("%#v: %v", v, err)
			continue
		}
		if want := referenceJSON(t, v); string(got) != want {
			t.Errorf("%#v: got %s, want %s", v, got, want)
		}
	}
	for _, bad := range []any{math.NaN(), math.Inf(1), json.Number("nope"), map[string]any{"x": math.Inf(-1)}} {
		if _, err := appendJSON(nil, bad); err == nil {
			t.Errorf("%v: no error", bad)
		}
	}
}
