package profile

import (
	"bytes"
	"testing"
)

// FuzzDecode feeds arbitrary bytes to the decoder: it must not panic, and
// what it accepts must be valid, encode again and decode to the same
// profile.
func FuzzDecode(f *testing.F) {
	f.Add([]byte(`{"version":1,"runs":1,"layers":[{"digest":"sha256:` + l1.Encoded() + `","chunks":[5,0,9],"times":[0,1,2]}]}`))
	f.Add([]byte(`{"version":1,"runs":2,"image":"sha256:` + img.Encoded() + `","layers":[{"digest":"sha256:` + l2.Encoded() + `","chunks":[1],"counts":[1]}]}`))
	f.Add([]byte(`{"version":2}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := Unmarshal(b)
		if err != nil {
			return
		}
		if err := p.Validate(); err != nil {
			t.Fatalf("accepted an invalid profile: %v", err)
		}
		enc, err := p.Marshal()
		if err != nil {
			t.Fatalf("accepted profile does not encode: %v", err)
		}
		q, err := Decode(bytes.NewReader(enc))
		if err != nil {
			t.Fatalf("re-encoded profile does not decode: %v", err)
		}
		enc2, err := q.Marshal()
		if err != nil || !bytes.Equal(enc, enc2) {
			t.Fatalf("not stable through a round trip: %v", err)
		}
		if m := Merge(p, q); m.Validate() != nil {
			t.Fatalf("merge of valid profiles is invalid: %v", m.Validate())
		}
	})
}
