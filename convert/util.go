package convert

import (
	"bytes"
	"io"

	specs "github.com/opencontainers/image-spec/specs-go"
)

func bytesReader(b []byte) io.Reader { return bytes.NewReader(b) }

func specsVersioned() specs.Versioned { return specs.Versioned{SchemaVersion: 2} }
