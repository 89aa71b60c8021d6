//go:build !lab

package main

import (
	"context"
	"errors"
	"io"
	"log/slog"
)

// labMain: an axctl for hosts is built without the lab and its test code.
func labMain(context.Context, []string, io.Writer, *slog.Logger) error {
	return errors.New("this axctl was built without the single-machine lab: build it with -tags lab (make build does)")
}
