// A Node.js HTTP server (libuv: epoll, eventfds, worker threads), with a
// timer and an inotify watch, standard library only.
//
// Usage: node node_server.js PORT DIR
// Answers GET / with JSON: pid, hits (requests so far, this one included),
// ticks (of a 200 ms interval timer), watched (fs.watch events on DIR).
// Prints "ready" once listening.
'use strict';
const fs = require('fs');
const http = require('http');

const [port, dir] = process.argv.slice(2);
let hits = 0;
let ticks = 0;
let watched = 0;
setInterval(() => { ticks++; }, 200);
fs.watch(dir, () => { watched++; });
// Some heap to carry over.
const ballast = [];
for (let i = 0; i < 100000; i++) ballast.push({ i, s: 'item ' + i });

http.createServer((req, res) => {
  hits++;
  res.setHeader('Connection', 'close');
  res.end(JSON.stringify({ pid: process.pid, hits, ticks, watched, ballast: ballast.length }) + '\n');
}).listen(Number(port), '127.0.0.1', () => console.log('ready'));
