// The training worker: the same package, training the rounds the page hands it.
import init, { runTrainer } from 'swarmtrain';

await init();
runTrainer();
